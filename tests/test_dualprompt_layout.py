"""DualPrompt's ``reference_prefix_layout``: LAMDA-PILOT's E-prefix layout (docs/methods.md §2.1).

The reference reshapes its selected E-prompts ``[layers, 2 (key, value), B, k, length, C]`` to
``[layers, B, 2, k * length, C]`` without a permute. In memory the batch is ``[keys of samples
0..B-1, values of samples 0..B-1]``, read in consecutive pairs: sample ``b`` takes blocks ``2b`` (key
prefix) and ``2b + 1`` (value prefix), where block ``c < B`` is sample ``c``'s key rows and block
``c >= B`` sample ``c - B``'s value rows. The tests below build that by hand, sample by sample.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_config
from test_prompt_learners import ADAM, CPU, _tiny_backbone

from pilot.api import make_learner
from pilot.data.pipeline import Batch
from pilot.data.scenario import make_scenario
from pilot.learners.base import build_learner
from pilot.learners.dualprompt import DualPrompt, reference_e_layout

SCENARIO = make_scenario(6, 2, 2)


def _learner(reference: bool, **kwargs) -> DualPrompt:
    """A DualPrompt on the tiny random ViT; the same seed gives the same weights in both modes."""
    learner = make_learner(
        "dualprompt", _tiny_backbone(), SCENARIO, CPU, optimizer=ADAM, reference_prefix_layout=reference, **kwargs
    )
    learner.begin_session(SCENARIO.sessions[0])
    return learner.eval()


def _own_rows(learner: DualPrompt, ids: list[int], layer: int, row: int) -> torch.Tensor:
    """Key (``row`` 0) or value (``row`` 1) prefix of E-layer ``layer`` for one sample that selected
    pool entries ``ids``: the ``k`` entries' rows concatenated, ``[k * length, C]``."""
    entries = [
        learner.e_pool.prompts[i].view(len(learner.e_prompt_layers), 2, learner.e_prompt_length, -1) for i in ids
    ]
    return torch.cat([entry[layer, row] for entry in entries])


def _hand_prefixes(learner: DualPrompt, indices: torch.Tensor, reference: bool) -> dict:
    """Prefixes per block, built sample by sample: the paper's (each sample its own key and value
    rows) or the reference's pairing of blocks 2b / 2b + 1 of [keys of all samples, values of all samples]."""
    B, L = indices.shape[0], learner.g_prompt_length
    ids = indices.tolist()
    prefixes = {
        layer: (learner.g_prompt[i, None, :L], learner.g_prompt[i, None, L:])
        for i, layer in enumerate(learner.g_prompt_layers)
    }

    def block(c: int, layer: int) -> torch.Tensor:  # block c of the reference's memory order
        return _own_rows(learner, ids[c], layer, 0) if c < B else _own_rows(learner, ids[c - B], layer, 1)

    for i, layer in enumerate(learner.e_prompt_layers):
        if reference:
            keys = [block(2 * b, i) for b in range(B)]
            values = [block(2 * b + 1, i) for b in range(B)]
        else:
            keys = [_own_rows(learner, ids[b], i, 0) for b in range(B)]
            values = [_own_rows(learner, ids[b], i, 1) for b in range(B)]
        prefixes[layer] = (torch.stack(keys), torch.stack(values))
    return prefixes


INDICES = {  # per-sample prompt ids [B, k]: even and odd B, top-1 and top-2, and one prompt shared by all
    "even": torch.tensor([[3], [0], [7], [1], [5], [2]]),
    "odd": torch.tensor([[4], [9], [2], [6], [1]]),
    "top2_odd": torch.tensor([[3, 8], [0, 1], [7, 2], [1, 9], [5, 4]]),
    "shared": torch.tensor([[1]] * 4),
}


@pytest.mark.parametrize("case", list(INDICES))
def test_prefixes_are_the_hand_built_layout(case):
    indices = INDICES[case]
    learner = _learner(reference=True, top_k=indices.shape[1])
    with torch.no_grad():
        for reference in (False, True):
            learner.reference_prefix_layout = reference
            got, expected = learner.prefixes(indices), _hand_prefixes(learner, indices, reference)
            assert sorted(got) == sorted(expected) == [0, 1, 2, 3, 4]
            for layer in expected:
                for g, e in zip(got[layer], expected[layer]):
                    torch.testing.assert_close(g.expand_as(e), e, rtol=0, atol=0)
    if case == "even":  # the rule in words, B = 6: samples 0-2 get key rows only, samples 3-5 value rows only
        key, value = learner.prefixes(indices)[2]
        torch.testing.assert_close(key[1], _own_rows(learner, [7], 0, 0), rtol=0, atol=0)  # key of sample 2
        torch.testing.assert_close(value[1], _own_rows(learner, [1], 0, 0), rtol=0, atol=0)  # key of sample 3
        torch.testing.assert_close(key[4], _own_rows(learner, [7], 0, 1), rtol=0, atol=0)  # value of sample 2
        torch.testing.assert_close(value[4], _own_rows(learner, [1], 0, 1), rtol=0, atol=0)  # value of sample 3
    if case == "odd":  # the middle sample straddles: key rows of the last sample, value rows of the first
        key, value = learner.prefixes(indices)[3]
        torch.testing.assert_close(key[2], _own_rows(learner, [1], 1, 0), rtol=0, atol=0)
        torch.testing.assert_close(value[2], _own_rows(learner, [4], 1, 1), rtol=0, atol=0)
    if case == "shared":  # one prompt: first half key rows as key and value, second half value rows as both
        key, value = learner.prefixes(indices)[4]
        own_key, own_value = _own_rows(learner, [1], 2, 0), _own_rows(learner, [1], 2, 1)
        for b, rows in enumerate([own_key, own_key, own_value, own_value]):
            torch.testing.assert_close(key[b], rows, rtol=0, atol=0)
            torch.testing.assert_close(value[b], rows, rtol=0, atol=0)


def test_layout_is_the_reference_reshape_in_head_split_form():
    """The reference's tensors: pool (layers, 2, pool, length, heads, head_dim), indexed by ids [B, k],
    reshaped to (layers, B, 2, k * length, heads, head_dim); per layer [:, 0] keys, [:, 1] values."""
    indices = torch.tensor([[3, 8], [0, 1], [7, 2], [1, 9], [5, 4], [6, 0], [2, 3]])
    learner = _learner(reference=True, top_k=2)
    B, k = indices.shape
    heads, length, layers = 3, learner.e_prompt_length, len(learner.e_prompt_layers)
    with torch.no_grad():
        pool = learner.e_pool.prompts.view(-1, layers, 2, length, heads, 16).permute(1, 2, 0, 3, 4, 5)
        selected = pool[:, :, indices].reshape(layers, B, 2, k * length, heads, 16)
        prefixes = learner.prefixes(indices)
        for i, layer in enumerate(learner.e_prompt_layers):
            torch.testing.assert_close(prefixes[layer][0], selected[i, :, 0].flatten(2), rtol=0, atol=0)
            torch.testing.assert_close(prefixes[layer][1], selected[i, :, 1].flatten(2), rtol=0, atol=0)


@pytest.mark.parametrize("reference", [False, True])
def test_logits_equal_the_vit_run_with_hand_built_prefixes(reference):
    torch.manual_seed(1)
    images = torch.rand(5, 3, 32, 32)
    indices = INDICES["odd"]
    learner = _learner(reference)
    with torch.no_grad():
        features = learner.vit.forward_features(images, prefixes=_hand_prefixes(learner, indices, reference))
        expected = learner.head(learner.vit.pooled(features))
        torch.testing.assert_close(learner.logits(images, indices), expected, rtol=1e-5, atol=1e-5)
        other = _hand_prefixes(learner, indices, not reference)
        wrong = learner.head(learner.vit.pooled(learner.vit.forward_features(images, prefixes=other)))
        assert (wrong - expected).abs().max() > 1e-2  # the two layouts really give different logits


@pytest.mark.parametrize("shared", [False, True])
def test_only_the_reference_layout_depends_on_the_batch_order(shared):
    torch.manual_seed(2)
    images = torch.rand(6, 3, 32, 32)
    indices = torch.tensor([[1]] * 6) if shared else INDICES["even"]
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    with torch.no_grad():
        for reference in (False, True):
            learner = _learner(reference)
            logits, permuted = learner.logits(images, indices), learner.logits(images[perm], indices[perm])
            if reference:
                assert (permuted - logits[perm]).abs().max() > 1e-2
            else:
                torch.testing.assert_close(permuted, logits[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batchwise", [False, True])
@pytest.mark.parametrize("size", [6, 5])  # two whole groups of 3; a whole group and a partial one of 2
def test_evaluation_applies_the_layout_per_vote_group(batchwise, size):
    torch.manual_seed(3)
    learner = _learner(True, vote_batch_size=3, eval_batch_size=6, batchwise_prompt_eval=batchwise)
    images = torch.rand(size, 3, 32, 32)

    def batch(part: slice) -> Batch:
        ids = torch.arange(size)[part]
        return Batch(images[part], lambda x: x, torch.zeros(len(ids), dtype=torch.long), ids, "test", False, size)

    large = learner.predict(batch(slice(None)))
    separately = torch.cat([learner.predict(batch(slice(0, 3))), learner.predict(batch(slice(3, None)))])
    torch.testing.assert_close(large, separately, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        query = learner.vit.query(images)
        indices = learner.e_pool.select(query, batchwise=batchwise, group_size=3).indices
        grouped = learner.logits(images, indices, group_size=3)[:, : learner.total]
        whole = learner.logits(images, indices)[:, : learner.total]
    torch.testing.assert_close(large, grouped, rtol=1e-5, atol=1e-5)
    assert (large - whole).abs().max() > 1e-2  # one layout over the whole eval batch would not be the reference's
    # The per-group layout is the whole-batch layout of each group's own tensor.
    e = torch.randn(3, 2, size, 4, 8)
    expected = torch.cat([reference_e_layout(e[:, :, :3]), reference_e_layout(e[:, :, 3:])], dim=2)
    torch.testing.assert_close(reference_e_layout(e, 3), expected, rtol=0, atol=0)


def test_training_uses_the_whole_batch_and_prediction_the_vote_groups():
    learner = _learner(True, vote_batch_size=3, eval_batch_size=6)
    seen, logits = [], learner.logits

    def recording(images: torch.Tensor, indices: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        seen.append(group_size)
        return logits(images, indices, group_size=group_size)

    learner.logits = recording  # type: ignore[method-assign]
    images = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 0, 1])
    learner.train().loss(Batch(images, lambda x: x, labels, torch.arange(4), "train", True, 4))
    learner.eval().predict(Batch(images, lambda x: x, labels, torch.arange(4), "test", False, 4))
    assert seen == [None, 3]


def test_config_default_is_the_papers_layout(tmp_path):
    cfg = compose_config(FAST + ["+method=dualprompt"], tmp_path)
    assert cfg.method.reference_prefix_layout is False
    cfg = compose_config(FAST + ["+method=dualprompt", "method.reference_prefix_layout=true"], tmp_path)
    learner = build_learner(cfg.method, _tiny_backbone(), SCENARIO, CPU)
    assert learner.reference_prefix_layout is True
