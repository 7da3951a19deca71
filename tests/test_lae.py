"""LAE: compensated prefixes, adapter and LoRA placement, the EMA, frozen epochs, the ensemble, runs."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config
from omegaconf import OmegaConf
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.backbones.lae_pet import (
    CompensatedPrefix,
    KVLoRA,
    ParallelAdapter,
    pets_attached,
)
from pilot.backbones.prompted_vit import prefix_attention
from pilot.data.pipeline import Batch
from pilot.data.scenario import make_scenario
from pilot.learners.lae import LAE, ensemble_probabilities
from pilot.runtime import Runtime

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)
ADAM = partial(torch.optim.Adam, lr=1e-2)


def _tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=48, depth=6,
        num_heads=3,
    )  # fmt: skip
    return Backbone(vit, "tiny", 32, None, None, pretrained=False)


def _learner(**kwargs) -> LAE:
    scenario = make_scenario(6, 2, 2, class_order="natural")
    return make_learner("lae", _tiny_backbone(), scenario, CPU, optimizer=kwargs.pop("optimizer", ADAM), **kwargs)


def _session(learner: LAE, index: int, batches: int = 2, size: int = 4) -> SimpleNamespace:
    """Session ``index`` begun on ``learner``, with a fixed list of training batches of its classes."""
    info = learner.scenario.sessions[index]
    learner.begin_session(info)
    gen = torch.Generator().manual_seed(index)
    stream = []
    for _ in range(batches):
        labels = torch.randint(info.known, info.total, (size,), generator=gen)
        stream.append(Batch(torch.rand(size, 3, 32, 32, generator=gen), lambda x: x, labels, labels, "train", True, 8))
    return SimpleNamespace(info=info, train_batches=lambda batch_size: stream)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _record_steps(learner: LAE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(online PET, head) after every optimiser step, read when the EMA hook runs."""
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    accumulate = learner.accumulate

    def record_then_accumulate() -> None:
        steps.append((_flat(learner.online), _flat(learner.head)))
        accumulate()

    learner.accumulate = record_then_accumulate  # type: ignore[method-assign]
    return steps


# ------------------------------------------------------------------------------------------ PET modules
def test_compensated_prefix_attention_is_the_closed_form():
    """out = Attn(q, P) + (1 - lam) Attn(q, k, v), lam = the softmax mass on the prefixes; then proj."""
    block = _tiny_backbone().freeze().vit.blocks[1]
    attn = block.attn
    torch.manual_seed(1)
    x, pk, pv = torch.randn(2, 5, 48), torch.randn(1, 4, 48), torch.randn(1, 4, 48)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 16).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(1, 4, 3, 16).transpose(1, 2)  # noqa: E731
    s_p, s_k = q @ heads(pk).transpose(-2, -1) / 4.0, q @ k.transpose(-2, -1) / 4.0
    lam = s_p.exp().sum(-1, keepdim=True) / (s_p.exp().sum(-1, keepdim=True) + s_k.exp().sum(-1, keepdim=True))
    mixed = s_p.softmax(-1) @ heads(pv) + (1 - lam) * (s_k.softmax(-1) @ v)
    expected = attn.proj(mixed.transpose(1, 2).reshape(2, 5, 48))
    torch.testing.assert_close(prefix_attention(attn, x, pk, pv, compensate=True), expected, rtol=1e-5, atol=1e-6)
    assert 0.05 < float(lam.min()) and float(lam.max()) < 0.95  # both terms matter in this example
    # Through a block: compensated or plain prefix attention, by the module's switch; undone on exit.
    for compensate, attention in ((True, partial(prefix_attention, compensate=True)), (False, prefix_attention)):
        prefix = CompensatedPrefix(48, length=4, compensate=compensate)
        undo = prefix.attach(block)
        keys, values = prefix.prefixes()
        torch.testing.assert_close(block.attn(x), attention(block.attn, x, keys, values), rtol=0, atol=0)
        undo()
    torch.testing.assert_close(block.attn(x), prefix_attention(attn, x, pk[:, :0], pv[:, :0]))  # patch removed
    assert (prefix.key_tokens >= 0).all() and (prefix.value_tokens <= 0.01).all()  # U(0, 0.01)
    assert prefix.key_scale.item() == prefix.value_scale.item() == 1.0 and prefix.key_tokens.shape == (4, 48)


def test_adapter_and_lora_are_the_identity_at_initialisation_and_sit_where_the_reference_puts_them():
    backbone = _tiny_backbone()
    vit, images = backbone.vit, torch.rand(3, 3, 32, 32)
    plain = backbone(images)
    for pets in (
        torch.nn.ModuleList(ParallelAdapter(48, 5) for _ in range(2)),
        torch.nn.ModuleList(KVLoRA(48, 5) for _ in range(2)),
    ):
        with pets_attached(vit, [0, 3], pets):
            torch.testing.assert_close(backbone(images), plain, rtol=0, atol=0)  # zero up / zero B
    # Adapter: parallel to the attention, on norm1(x): h = x + attn(n) + s * up(gelu(down(n))).
    adapter, block, x = ParallelAdapter(48, 5), vit.blocks[2], torch.randn(2, 17, 48)
    with torch.no_grad():
        adapter.up.weight.normal_(), adapter.scale.fill_(0.5)
    n = block.norm1(x)
    h = x + block.attn(n) + 0.5 * adapter.up(F.gelu(adapter.down(n)))
    undo = adapter.attach(block)
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)), rtol=1e-5, atol=1e-5)
    undo()
    # LoRA: qkv with W + [0; s_k B_k A_k; s_v B_v A_v] (queries untouched).
    lora, qkv = KVLoRA(48, 5), vit.blocks[2].attn.qkv
    with torch.no_grad():
        lora.lora_b.normal_(), lora.scale.copy_(torch.tensor([2.0, -1.0]))
    delta = torch.cat([torch.zeros(48, 48), *(lora.scale[i] * lora.lora_b[i] @ lora.lora_a[i] for i in range(2))])
    undo = lora.attach(vit.blocks[2])
    torch.testing.assert_close(qkv(x), F.linear(x, qkv.weight + delta, qkv.bias), rtol=1e-5, atol=1e-5)
    undo()
    torch.testing.assert_close(backbone(images), plain, rtol=0, atol=0)  # every hook removed


def test_trainable_parameters_on_vit_b16_match_the_reference():
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    backbone = Backbone(vit, "vit_base_patch16_224", 224, None, None, pretrained=False)
    scenario, head = make_scenario(100, 10, 10), 768 * 100 + 100
    # 5 blocks x: prefix 2 x (10 x 768 + 1); adapter 768 x 5 + 5 + 5 x 768 + 768 + 1; LoRA 2 x (2 x 5 x 768) + 2
    for pet, per_block in (("prefix", 15_362), ("adapter", 8_454), ("lora", 15_362)):
        learner = make_learner("lae", backbone, scenario, CPU, optimizer=ADAM, pet=pet)
        assert sum(p.numel() for p in learner.parameters() if p.requires_grad) == 5 * per_block + head, pet
        assert sum(p.numel() for p in learner.offline.parameters()) == 5 * per_block
        assert not any(p.requires_grad for p in learner.offline.parameters())
        assert not any(k.startswith("backbone.") for k in learner.state_dict())


# --------------------------------------------------------------------------------------- the ensemble
def test_ensemble_is_the_classwise_max_of_the_softmax_outputs():
    online, offline = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    a, b = 1 / (math.e**2 + 2), 1 / (2 + math.e**3)
    expected = torch.tensor([[max(math.e**2 * a, b), max(a, b), max(a, math.e**3 * b)]])
    torch.testing.assert_close(ensemble_probabilities([online, offline]), expected)
    assert ensemble_probabilities([online, offline]).argmax().item() == 2  # offline is the more confident
    # predict: logits cut to the seen classes (2 after session 0, 4 after session 1), then the ensemble of
    # both experts from session 1 on (official) or from session 0 on (PILOT's offline_from_start).
    online, offline = torch.tensor([[2.0, 0.0, 0.5, 1.0, 0, 0]]), torch.tensor([[0.0, 1.5, 3.0, 0.0, 0, 0]])
    for from_start, session in ((False, 0), (False, 1), (True, 0)):
        learner = _learner(offline_from_start=from_start).eval()
        for index in range(session + 1):
            learner.begin_session(learner.scenario.sessions[index])
        fixed = {id(learner.online): online, id(learner.offline): offline}
        learner.logits = lambda images, pets: fixed[id(pets)].expand(len(images), -1)  # type: ignore[method-assign]
        images = torch.rand(2, 3, 32, 32)
        probs = learner.predict(
            Batch(images, lambda x: x, torch.zeros(2, dtype=torch.long), torch.arange(2), "test", False, 2)
        )
        seen = 2 * (session + 1)
        on, off = online[:, :seen].softmax(-1), offline[:, :seen].softmax(-1)
        expected = on if (session, from_start) == (0, False) else torch.maximum(on, off)
        torch.testing.assert_close(probs, expected.expand(2, -1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ training schedule
def test_offline_pet_is_the_ema_of_the_online_pet_after_every_step():
    """After k steps, θ_off = d^k θ_off,0 + sum_i (1 - d) d^(k-i) θ_on,i (θ_on,i after step i)."""
    learner = _learner(offline_from_start=True, ema_decay=0.8, epochs=2, num_freeze_epochs=0)
    start = _flat(learner.offline)
    session = _session(learner, 0, batches=3)
    steps = _record_steps(learner)
    learner.train_session(session)
    assert len(steps) == 6  # 2 epochs x 3 batches
    expected = 0.8**6 * start + sum(0.2 * 0.8 ** (6 - i) * on for i, (on, _) in enumerate(steps, start=1))
    torch.testing.assert_close(_flat(learner.offline), expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(steps[0][0], steps[-1][0])  # the online PET did train


def test_official_offline_pet_starts_from_the_trained_online_pet_in_session_one():
    learner = _learner(epochs=1)
    start = _flat(learner.offline)
    steps = _record_steps(learner)
    learner.train_session(_session(learner, 0))
    assert steps == [] and torch.equal(_flat(learner.offline), start)  # no EMA in session 0
    assert not torch.equal(_flat(learner.online), start)  # session 0 trains the PET from its first epoch
    session = _session(learner, 1)  # begin_session(1) copies θ_on into θ_off
    torch.testing.assert_close(_flat(learner.offline), _flat(learner.online), rtol=0, atol=0)
    learner.train_session(session)
    assert len(steps) == 2


@pytest.mark.parametrize("freeze_first_session", [False, True])
def test_frozen_epochs_leave_the_pet_unchanged_and_adam_starts_it_afresh(freeze_first_session):
    learner = _learner(
        epochs=3, num_freeze_epochs=2, offline_from_start=True, freeze_first_session=freeze_first_session
    )
    for index in (0, 1):
        start_pet, start_head = _flat(learner.online), _flat(learner.head)
        session = _session(learner, index)
        steps = _record_steps(learner)
        learner.train_session(session)
        frozen = 0 if index == 0 and not freeze_first_session else 4  # 2 frozen epochs x 2 batches
        pets = [start_pet, *(pet for pet, _ in steps)]
        assert all(torch.equal(pets[i], start_pet) for i in range(frozen + 1))
        assert all(not torch.equal(pets[i + 1], pets[i]) for i in range(frozen, 6))
        assert all(not torch.equal(head, start_head) for _, head in steps)  # the head learns in every step
        # The PET's first Adam step: fresh moments, so every element moves by about lr (1e-2).
        first = (pets[frozen + 1] - pets[frozen]).abs()
        assert float(first.max()) <= 1e-2 * (1 + 1e-4) and float(first.median()) > 0.9e-2
        assert all(p.requires_grad for p in learner.online.parameters())


def test_training_loss_ignores_the_old_classes():
    learner = _learner()
    _session(learner, 0)
    session = _session(learner, 1)
    batch = session.train_batches(4)[0]
    logits = learner.logits(batch.images, learner.online)
    expected = F.cross_entropy(logits[:, 2:4], batch.labels - 2)
    torch.testing.assert_close(learner.loss(batch), expected)


# ----------------------------------------------------------------------------------------- whole runs
def test_reference_defaults_per_dataset(tmp_path):
    def method(*overrides):
        return OmegaConf.to_container(
            compose_config(["logger=csv", "+method=lae", *overrides], tmp_path), resolve=True
        )["method"]

    cifar, inr = method(), method("dataset=imagenet_r")
    keys = ("epochs", "num_freeze_epochs", "batch_size", "pet", "pet_length", "pet_layers", "ema_decay")
    assert [cifar[k] for k in keys] == [5, 3, 128, "prefix", 10, [0, 1, 2, 3, 4], 0.9999]  # exps/lae.json
    assert [inr[k] for k in keys] == [50, 30, 128, "prefix", 10, [0, 1, 2, 3, 4], 0.9999]  # exps/lae_inr.json
    assert (cifar["optimizer"]["lr"], inr["optimizer"]["lr"], cifar["scheduler"]) == (0.0028125, 0.00046875, None)


@pytest.mark.parametrize("pet", ["prefix", "adapter", "lora"])
def test_two_sessions_resume_identically(pet, tmp_path):
    switches = ["method.offline_from_start=true", "method.freeze_first_session=true"] if pet == "lora" else []
    overrides = (
        FAST + TWO_SESSIONS + small_overrides("lae") + ["method.num_freeze_epochs=0", f"method.pet={pet}", *switches]
    )
    assert_resumes_identically(overrides, tmp_path)
