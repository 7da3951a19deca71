"""Side-by-side check of our DER learner against LAMDA-PILOT's ``models/der.py`` / ``DERNet``.

Protocol (as ``scripts/compare_with_pilot.py``, whose helpers this script imports): CPU, float32, the same
seeded *random* ViT-B/16 weights on both sides, the same images in [0, 1]. PILOT's code runs in its own
environment (timm 0.6.13) and loads the weights through its real path: ``timm.create_model(...,
pretrained=True)`` reads timm's ``.npz`` checkpoint, here an ``.npz`` written from the shared weights
(the download is redirected to it; nothing is fetched). The setting is ``exps/der.json`` (CIFAR B0Inc10),
one epoch of one batch per session, the optimiser's ``step`` a no-op that records the gradients (the
parameters stay as loaded).

* **session 0** (PILOT ``_train`` -> ``_init_train``; ours ``DER.train_session``): backbone f_0 and the
  given head ``fc0`` [10, 768]: loss, logits, the gradient of every tensor, SGD settings, trainable count.
* **session 1**: f_0 is replaced by a given "trained" f_0 on both sides, then each side grows (PILOT
  ``update_fc(20)`` + ``incremental_train``'s freeze loop; ours ``begin_session``). Recorded: f_1 against
  the trained f_0 (a copy), the old block of the new head, the fresh entries' range (``SimpleLinear``:
  U(+-sqrt(3/1536)), bias 0). Then both load the same ``fc1`` [20, 1536] and ``aux1`` [11, 768] and take
  the step: loss, its CE terms (classifier, auxiliary), logits, auxiliary logits, gradients (f_1, heads;
  f_0 gets none on both sides), SGD settings, trainable count.
* **evaluation after session 1**: logits and the concatenated features herding and NME read
  (PILOT ``extract_vector``; ours ``exemplar_features``).

Commands::

    .venv/bin/python scripts/fidelity/der.py make-inputs --out /tmp/der_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/der.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/der_fid --out /tmp/der_fid/pilot.pt
    .venv/bin/python scripts/fidelity/der.py ours --inputs /tmp/der_fid --out /tmp/der_fid/ours.pt
    .venv/bin/python scripts/fidelity/der.py compare /tmp/der_fid/pilot.pt /tmp/der_fid/ours.pt
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import common
import torch
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row


# --------------------------------------------------------------------------------------- shared
def uniform(gen: torch.Generator, bound: float, *shape: int) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen) * 2 - 1) * bound


def base_inputs(seed: int, batch: int) -> Record:
    """The shared ViT, a "trained" copy of it, images, labels of sessions 0 and 1 (old and new classes)."""
    vit, gen = common.seeded_vit(seed)
    old = batch // 2
    return {
        "meta": common.input_meta(seed, batch=batch),
        "vit": vit,
        "vit_trained": {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "images": cwp.random_images(batch, gen),
        "labels0": torch.randint(0, KNOWN, (batch,), generator=gen),
        "labels1": torch.cat(
            [torch.randint(0, KNOWN, (old,), generator=gen), torch.randint(KNOWN, TOTAL, (batch - old,), generator=gen)]
        ),
        "gen": gen,
    }


def head_inputs(gen: torch.Generator, features: int) -> Record:
    """Given heads: fc0 [10, 768], fc1 [20, features], aux1 [11, 768] (SimpleLinear-like values, small biases)."""
    return {
        "fc0_w": uniform(gen, math.sqrt(3 / DIM), KNOWN, DIM),
        "fc0_b": 0.01 * torch.randn(KNOWN, generator=gen),
        "fc1_w": uniform(gen, math.sqrt(3 / features), TOTAL, features),
        "fc1_b": 0.01 * torch.randn(TOTAL, generator=gen),
        "aux1_w": uniform(gen, math.sqrt(3 / DIM), INCREMENT + 1, DIM),
        "aux1_b": 0.01 * torch.randn(INCREMENT + 1, generator=gen),
    }


def timm_to_npz(state: dict[str, torch.Tensor], path: Path) -> None:
    """A timm ViT state dict as the Google ``.npz`` checkpoint timm 0.6's ``_load_weights`` reads (its inverse)."""
    import numpy as np

    heads = state["blocks.0.attn.qkv.weight"].shape[1] // 64
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha, dim = p + "MultiHeadDotProductAttention_1/", state[b + "norm1.weight"].shape[0]
        qkv_w, qkv_b = state[b + "attn.qkv.weight"].chunk(3), state[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[f"{mha}{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
            out[f"{mha}{name}/bias"] = bias.reshape(heads, dim // heads)
        out[mha + "out/kernel"] = state[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).permute(1, 2, 0)
        out[mha + "out/bias"] = state[b + "attn.proj.bias"]
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = state[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = state[f"{b}mlp.fc{r + 1}.bias"]
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = state[f"{b}{ours}.weight"], state[f"{b}{ours}.bias"]
        i += 1
    np.savez(path, **{k: v.detach().contiguous().numpy() for k, v in out.items()})


@contextlib.contextmanager
def npz_downloads(vit: dict[str, torch.Tensor]) -> Iterator[None]:
    """timm 0.6's custom (npz) pretrained loader reads ``vit`` (an npz in a temporary folder), no download."""
    import timm.models.helpers as helpers

    original = helpers.download_cached_file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vit.npz"
        timm_to_npz(vit, path)
        helpers.download_cached_file = lambda *args, **kwargs: str(path)
        try:
            yield
        finally:
            helpers.download_cached_file = original


def pilot_args(pilot_src: Path, name: str) -> Record:
    args = json.loads((pilot_src / "exps" / f"{name}.json").read_text())
    args.update(device=["cpu"], init_epoch=1, epochs=1)
    return args


def recorded_steps(store: list, names: dict[int, str]) -> contextlib.AbstractContextManager[None]:
    """``SGD.step`` records the named gradients and the groups' settings, and leaves the parameters alone."""

    def record(optimizer: torch.optim.SGD) -> Record:
        settings = [{k: g[k] for k in ("lr", "momentum", "weight_decay")} for g in optimizer.param_groups]
        count = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return {"grads": common.named_grads(optimizer, names), "settings": settings, "in_optimizer": count}

    return common.recorded_sgd_steps(store, record)


@contextlib.contextmanager
def recorded_cross_entropy(store: list) -> Iterator[None]:
    """Every ``F.cross_entropy`` value (PILOT's loss terms, in the order its loop computes them)."""
    import torch.nn.functional as F

    original = F.cross_entropy

    def ce(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        store.append(cwp.detached(out))
        return out

    F.cross_entropy = ce  # type: ignore[assignment]
    try:
        yield
    finally:
        F.cross_entropy = original  # type: ignore[assignment]


def renamed(name: str, rules: list[tuple[str, str]]) -> str:
    """A parameter name in the neutral layout (first matching regex rule)."""
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def names_of(module: torch.nn.Module, rules: list[tuple[str, str]]) -> dict[int, str]:
    return {id(p): renamed(n, rules) for n, p in module.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def fresh_block(weight: torch.Tensor, bias: torch.Tensor, rows: int, cols: int) -> Record:
    """Range of a grown head's fresh entries (rows >= ``rows`` or columns >= ``cols``) against sqrt(3 / in)."""
    fresh = torch.cat([weight[:rows, cols:].flatten(), weight[rows:].flatten()])
    return {
        "max_abs_over_bound": float(fresh.abs().max()) / math.sqrt(3 / weight.shape[1]),
        "new_bias_max_abs": float(bias[rows:].abs().max()),
    }


class OneBatchSession:
    """What our learners read of a session: the given batch as the replay stream and the training stream."""

    def __init__(self, info: Any, batch: Any) -> None:
        self.info, self.batch = info, batch

    def replay_batches(self, batch_size: int, memory_ids: Any) -> list:
        return [self.batch]

    def train_batches(self, batch_size: int, *args: Any, **kwargs: Any) -> list:
        return [self.batch]


def our_setup(name: str, vit: dict[str, torch.Tensor], **params: Any) -> Any:
    from pilot.api import make_learner
    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    return make_learner(name, cwp.our_backbone(vit), scenario, runtime, epochs=1, init_epochs=1, **params)


def load_head(layer: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def our_step(learner: Any, inputs: Record, labels: torch.Tensor, index: int, rules: list) -> Record:
    """``train_session`` on the one batch: loss terms, outputs, gradients, SGD settings, trainable count."""
    batch = cwp.our_batch(inputs["images"], labels, "train")
    terms: list = []
    original = learner.losses

    def losses(b: Any) -> dict:
        out = original(b)
        terms.append({k: cwp.detached(v) for k, v in out.items()})
        return out

    learner.losses = losses
    steps: list = []
    with recorded_steps(steps, names_of(learner, rules)):
        learner.train_session(OneBatchSession(learner.scenario.sessions[index], batch))
    del learner.losses
    with torch.no_grad():
        learner.train()
        outputs = learner.extractor_outputs(batch.images)
        features = torch.cat(outputs, 1)
        logits, aux = learner.classifier(features), learner.classifier.auxiliary(outputs[-1])
    total = terms[0]["clf"] + learner.aux_weight * terms[0]["aux"] if "aux" in terms[0] else terms[0]["clf"]
    return {
        "loss": total,
        "ce": [terms[0]["clf"], *([terms[0]["aux"]] if "aux" in terms[0] else [])],
        "outputs": {"logits": logits, "aux_logits": aux, "features": features},
        **steps[0],
        "trainable": sum(p.numel() for p in learner.parameters() if p.requires_grad),
    }


def pilot_step(learner: Any, net: torch.nn.Module, inputs: Record, labels: torch.Tensor, rules: list) -> Record:
    """PILOT's ``_train`` on a one-batch loader (its test pass reads the same batch)."""
    losses: list = []
    ces: list = []
    steps: list = []
    outputs: list = []
    loader = cwp.one_batch(inputs["images"], labels)
    with (
        cwp.captured_backward(losses),
        recorded_cross_entropy(ces),
        recorded_steps(steps, names_of(net, rules)),
        cwp.forward_outputs(net, outputs, lambda out: {k: cwp.detached(v) for k, v in out.items()}),
    ):
        learner._train(loader, loader)
    return {
        "loss": losses[0],
        "ce": ces,
        "outputs": outputs[0],
        **steps[0],
        "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
    }


def step_rows(session: str, ours: Record, ref: Record, groups: list[str]) -> list[list[str]]:
    """Loss, CE terms, outputs and the gradients of every neutral group (all tensors as one vector + worst)."""
    rows = [diff_row(f"{session}: loss", ours["loss"].reshape(()), ref["loss"].reshape(()))]
    for i, name in enumerate(("classifier CE", "auxiliary CE")[: len(ref["ce"])]):
        rows.append(diff_row(f"{session}: {name}", ours["ce"][i].reshape(()), ref["ce"][i].reshape(())))
    for key in ("logits", "aux_logits", "features"):
        if key in ref["outputs"] and (key != "aux_logits" or len(ref["ce"]) > 1):
            rows.append(diff_row(f"{session}: {key}", ours["outputs"][key], ref["outputs"][key]))
    if set(ours["grads"]) != set(ref["grads"]):
        rows.append(
            [f"{session}: gradient names differ", str(sorted(set(ours["grads"]) ^ set(ref["grads"])))[:200], "", "", ""]
        )
    for group in groups:
        theirs = {k: v for k, v in ref["grads"].items() if k.startswith(group + ".")}
        if theirs:
            mine = {k: ours["grads"][k] for k in theirs}
            rows += common.grouped_rows(session, f"gradient `{group}`", mine, theirs)[: 2 if len(theirs) > 2 else 1]
    return rows


def step_notes(session: str, ours: Record, ref: Record) -> str:
    with_grad_ref = sum(v.numel() for v in ref["grads"].values())
    with_grad_ours = sum(v.numel() for v in ours["grads"].values())
    return (
        f"{session}: SGD groups PILOT {ref['settings']}, ours {ours['settings']}; trainable parameters PILOT "
        f"{ref['trainable']:,} (in its optimiser {ref['in_optimizer']:,}), ours {ours['trainable']:,}; "
        f"parameters that received a gradient PILOT {with_grad_ref:,}, ours {with_grad_ours:,}."
    )


# ---------------------------------------------------------------------------------------- DER
PILOT_RULES = [(r"^backbones\.(\d+)\.", r"f\1."), (r"^aux_fc\.", "aux.")]
OUR_RULES = [(r"^backbone\.model\.", "f0."), (r"^grown\.0\.model\.", "f1."), (r"^classifier\.", "")]
GROUPS = ["f0", "f1", "fc", "aux"]


def make_inputs(out: Path, seed: int, batch: int) -> None:
    inputs = base_inputs(seed, batch)
    inputs.update(head_inputs(inputs.pop("gen"), 2 * DIM))
    common.save_inputs(inputs, out)


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    from models.der import Learner

    learner = Learner(pilot_args(pilot_src, "der"))
    net = learner._network
    learner._cur_task, learner._total_classes = 0, KNOWN
    with npz_downloads(inputs["vit"]):
        net.update_fc(KNOWN)
    loaded = max_diff(net.backbones[0].state_dict(), inputs["vit"])
    load_head(net.fc, inputs["fc0_w"], inputs["fc0_b"])
    s0 = pilot_step(learner, net, inputs, inputs["labels0"], PILOT_RULES)

    learner.after_task()
    net.backbones[0].load_state_dict(inputs["vit_trained"])
    learner._cur_task, learner._total_classes = 1, TOTAL
    with npz_downloads(inputs["vit"]):
        net.update_fc(TOTAL)
    structure = {
        "f1 - trained f0": max_diff(net.backbones[1].state_dict(), inputs["vit_trained"]),
        "fc old block - fc0": float((net.fc.weight.detach()[:KNOWN, :DIM] - inputs["fc0_w"]).abs().max()),
        **fresh_block(net.fc.weight.detach(), net.fc.bias.detach(), KNOWN, DIM),
        "aux shape": list(net.aux_fc.weight.shape),
    }
    for i in range(learner._cur_task):  # incremental_train's freeze loop
        for p in net.backbones[i].parameters():
            p.requires_grad = False
    load_head(net.fc, inputs["fc1_w"], inputs["fc1_b"])
    load_head(net.aux_fc, inputs["aux1_w"], inputs["aux1_b"])
    s1 = pilot_step(learner, net, inputs, inputs["labels1"], PILOT_RULES)
    net.eval()
    with torch.no_grad():
        evaluation = {
            "logits": cwp.detached(net(inputs["images"])["logits"]),
            "features": cwp.detached(net.extract_vector(inputs["images"])),
        }
    meta = common.pilot_meta(pilot_src, npz_load_max_diff=loaded)
    return {"meta": meta, "s0": s0, "s1": s1, "structure": structure, "eval": evaluation}


def run_ours(inputs: Record) -> Record:
    learner = our_setup("der", inputs["vit"])
    s = learner.scenario.sessions
    learner.train()
    learner.begin_session(s[0])
    load_head(learner.classifier.fc, inputs["fc0_w"], inputs["fc0_b"])
    s0 = our_step(learner, inputs, inputs["labels0"], 0, OUR_RULES)

    learner.backbone.model.load_state_dict(inputs["vit_trained"])
    learner.begin_session(s[1])
    fc = learner.classifier.fc
    structure = {
        "f1 - trained f0": max_diff(learner.grown[0].model.state_dict(), inputs["vit_trained"]),
        "fc old block - fc0": float((fc.weight.detach()[:KNOWN, :DIM] - inputs["fc0_w"]).abs().max()),
        **fresh_block(fc.weight.detach(), fc.bias.detach(), KNOWN, DIM),
        "aux shape": list(learner.classifier.aux.weight.shape),
    }
    load_head(fc, inputs["fc1_w"], inputs["fc1_b"])
    load_head(learner.classifier.aux, inputs["aux1_w"], inputs["aux1_b"])
    s1 = our_step(learner, inputs, inputs["labels1"], 1, OUR_RULES)
    learner.eval()
    batch = cwp.our_batch(inputs["images"], inputs["labels1"], "test")
    with torch.no_grad():
        evaluation = {
            "logits": cwp.detached(learner.predict(batch)),
            "features": cwp.detached(learner.exemplar_features(batch.images)),
        }
    return {
        "meta": common.our_meta(),
        "s0": s0,
        "s1": s1,
        "structure": structure,
        "eval": evaluation,
    }


def report(ours: Record, ref: Record, groups: list[str] = GROUPS, title: str = "DER") -> str:
    rows = step_rows("session 0", ours["s0"], ref["s0"], groups) + step_rows("session 1", ours["s1"], ref["s1"], groups)
    rows += [diff_row(f"eval after session 1: {k}", ours["eval"][k], ref["eval"][k]) for k in ref["eval"]]
    notes = [
        f"{title}: {common.headline(ours, ref)}; CPU float32, random ViT-B/16, "
        f"{ours['meta']['inputs']['batch']} images.",
        f"PILOT's npz load of the shared weights: max abs diff {ref['meta']['npz_load_max_diff']:.1e}.",
        step_notes("session 0", ours["s0"], ref["s0"]),
        step_notes("session 1", ours["s1"], ref["s1"]),
        f"Structure (as built, and grown at session 1): PILOT {ref['structure']}; ours {ours['structure']}.",
    ]
    return common.diff_report(notes, rows, sep="\n\n")


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=6)
