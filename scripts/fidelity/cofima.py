"""Side-by-side check of our CoFiMA learner against LAMDA-PILOT's ``models/cofima.py``.

Protocol (as ``scripts/compare_with_pilot.py``, whose helpers this script imports): CPU, float32, the
same seeded *random* ViT-B/16 weights (timm key names) on both sides, the same images in [0, 1].
PILOT's code is imported from its checkout and runs in its own environment; its backbone factory
calls ``timm.create_model(..., pretrained=True)``, which is redirected here to a randomly initialised
model loaded with the shared weights (nothing is downloaded). The setting is ``exps/cofima.json``
(CIFAR B0Inc10) at session 1: head 0 (classes 0-9, frozen) and head 1 (classes 10-19), both given.

Compared, each side running its own code:

* **stage-1 step** (PILOT ``_stage1_training`` with ``epochs=1`` on a one-batch loader; ours
  ``CoFiMA.train_session`` on the same batch): the loss, the gradient of every backbone tensor and of
  the new head, the learning rates of the parameter groups and the trainable parameter count. The
  optimiser's ``step`` is a no-op that records the gradients (the parameters stay as loaded).
* **Fisher** (PILOT ``getFisherDiagonal``; ours ``CoFiMA.fisher``) over the batch split into two
  batches of 4: backbone and new head. The old head is reported, not compared: PILOT reads the stale
  ``p.grad`` of the frozen head (none in this fresh process, so 0); ours differentiates the loss.
* **merge on given tensors**: theta*_0 (a perturbed ViT and aligned head 0), theta_1 (the shared ViT and
  the given heads), F_0 and F_1 (random, partly 0, partly clipped). PILOT: ``interpolate_weights``
  (``fisher=True`` and ``fisher=False``); ours: ``CoFiMA.end_session`` with its Fisher pass returning
  F_1 and the alignment recording its starting heads instead of training (CoFiMA, and CoMA with
  ``fisher_weighting=false``). Compared: the merged backbone and the heads alignment starts from.

Commands::

    .venv/bin/python scripts/fidelity/cofima.py make-inputs --out /tmp/cofima_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/cofima.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/cofima_fid --out /tmp/cofima_fid/pilot.pt
    .venv/bin/python scripts/fidelity/cofima.py ours --inputs /tmp/cofima_fid --out /tmp/cofima_fid/ours.pt
    .venv/bin/python scripts/fidelity/cofima.py compare /tmp/cofima_fid/pilot.pt /tmp/cofima_fid/ours.pt
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import common
import torch
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row, headline


# --------------------------------------------------------------------------------------- shared
@contextlib.contextmanager
def shared_timm_weights(vit: dict[str, torch.Tensor]) -> Iterator[None]:
    """``timm.create_model`` builds a random model and loads the shared ViT weights (no download)."""
    import timm

    original = timm.create_model

    def create(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        model = original(name, pretrained=False, **kwargs)
        cwp.load_vit(model, vit, ("head.",))
        return model

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = original


def recorded_steps(store: list, names: dict[int, str]) -> contextlib.AbstractContextManager[None]:
    """``SGD.step`` records the groups' lrs and the named gradients (first step only), and leaves the
    parameters alone."""

    def record(optimizer: torch.optim.SGD) -> Record:
        grads = common.named_grads(optimizer, names) if not store else {}
        return {"lrs": [g["lr"] for g in optimizer.param_groups], "grads": grads}

    return common.recorded_sgd_steps(store, record)


def pilot_args(pilot_src: Path, name: str, **extra: Any) -> dict[str, Any]:
    args = json.loads((pilot_src / "exps" / f"{name}.json").read_text())
    args.update(device=["cpu"], num_workers=0, **extra)
    return args


class OneBatchSession:
    """What our learners read of a session, serving given batches (training and prototype passes)."""

    def __init__(self, info: Any, batches: list) -> None:
        self.info, self.batches = info, batches

    def train_batches(
        self, batch_size: int, augment: bool = True, shuffle: bool = True, drop_last: bool = False
    ) -> list:
        return self.batches

    def prototype_batches(self, batch_size: int) -> list:
        return self.batches


def split(images: torch.Tensor, labels: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.chunk(parts), labels.chunk(parts)))


# ---------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int, batch: int) -> None:
    vit, gen = common.seeded_vit(seed)

    def fisher_like(t: torch.Tensor) -> torch.Tensor:  # in [0, 1.2e-4], clipped at 1e-4, ~10% exact zeros
        f = (torch.rand(t.shape, generator=gen) * 1.2e-4).clamp_max(1e-4)
        return f * (torch.rand(t.shape, generator=gen) > 0.1)

    head_w, head_b = 0.02 * torch.randn(TOTAL, DIM, generator=gen), 0.01 * torch.randn(TOTAL, generator=gen)
    theta0 = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in vit.items()}
    aligned_w, aligned_b = head_w[:KNOWN] + 0.01 * torch.randn(KNOWN, DIM, generator=gen), head_b[:KNOWN] + 0.01
    inputs = {
        "meta": common.input_meta(seed, batch=batch),
        "vit": vit,
        "images": cwp.random_images(batch, gen),
        "labels": torch.randint(KNOWN, TOTAL, (batch,), generator=gen),
        "head_w": head_w,
        "head_b": head_b,
        "theta0": {"vit": theta0, "head_w": aligned_w, "head_b": aligned_b},
        "fisher0": {
            "vit": {k: fisher_like(v) for k, v in vit.items()},
            "head_w": fisher_like(aligned_w),
            "head_b": fisher_like(aligned_b),
        },
        "fisher1": {
            "vit": {k: fisher_like(v) for k, v in vit.items()},
            "head_w": fisher_like(head_w),
            "head_b": fisher_like(head_b),
        },
    }
    common.save_inputs(inputs, out)


# ---------------------------------------------------------------------------------- PILOT side
def pilot_state(vit: dict, head_w: torch.Tensor, head_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """A neutral (vit, heads) triple as PILOT's SLCANet state dict (one head per 10 classes)."""
    state = {f"backbone.{k}": v for k, v in vit.items()}
    for i in range(len(head_w) // INCREMENT):
        rows = slice(i * INCREMENT, (i + 1) * INCREMENT)
        state[f"fc.heads.{i}.0.weight"], state[f"fc.heads.{i}.0.bias"] = head_w[rows], head_b[rows]
    return state


def neutral(state: dict[str, torch.Tensor], prefix: str = "backbone.") -> Record:
    """PILOT's state (or Fisher) dict -> {"vit": {...}, "head_w", "head_b"} (heads concatenated)."""
    heads = sorted({int(k.split(".")[2]) for k in state if k.startswith("fc.heads.")})
    return {
        "vit": {k[len(prefix) :]: cwp.detached(v) for k, v in state.items() if k.startswith(prefix)},
        "head_w": torch.cat([cwp.detached(state[f"fc.heads.{i}.0.weight"]) for i in heads]),
        "head_b": torch.cat([cwp.detached(state[f"fc.heads.{i}.0.bias"]) for i in heads]),
    }


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    from models.cofima import Learner, interpolate_weights

    with shared_timm_weights(inputs["vit"]):
        learner = Learner(pilot_args(pilot_src, "cofima", epochs=1))
    net = learner._network
    net.update_fc(INCREMENT)
    net.update_fc(INCREMENT)  # head 0 frozen
    net.load_state_dict(pilot_state(inputs["vit"], inputs["head_w"], inputs["head_b"]))
    learner._cur_task, learner._known_classes, learner._total_classes = 1, KNOWN, TOTAL
    learner.task_sizes = [INCREMENT, INCREMENT]
    names = {id(p): n for n, p in net.named_parameters()}
    images, labels = inputs["images"], inputs["labels"]
    losses: list = []
    steps: list = []
    with cwp.captured_backward(losses), recorded_steps(steps, names):
        learner._stage1_training(cwp.one_batch(images, labels), cwp.one_batch(images, labels))
    stage1 = {"loss": losses[0], "grads": neutral(steps[0]["grads"]), "lrs": steps[0]["lrs"]}
    stage1["trainable"] = cwp.trainable_count(p for g in learner.optimizer.param_groups for p in g["params"])

    loader = [(torch.arange(len(y)), x, y) for x, y in split(images, labels, 2)]
    fisher = neutral(learner.getFisherDiagonal(loader, learner.optimizer))

    theta0 = pilot_state(inputs["theta0"]["vit"], inputs["theta0"]["head_w"], inputs["theta0"]["head_b"])
    theta1 = copy.deepcopy(net.state_dict())
    f0 = pilot_state(inputs["fisher0"]["vit"], inputs["fisher0"]["head_w"], inputs["fisher0"]["head_b"])
    f1 = pilot_state(inputs["fisher1"]["vit"], inputs["fisher1"]["head_w"], inputs["fisher1"]["head_b"])
    merged = interpolate_weights(theta0, theta1, alpha=learner.wt_lambda, fisher=True, fisher_mat=[f0, f1])
    coma = interpolate_weights(theta0, theta1, alpha=learner.wt_lambda)
    return {
        "meta": common.pilot_meta(pilot_src),
        "stage1": stage1,
        "fisher": fisher,
        "merge": neutral(merged),
        "coma": neutral(coma),
    }


# ----------------------------------------------------------------------------------- our side
def our_learner(inputs: Record, **params: Any) -> Any:
    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    from pilot.api import make_learner

    learner = make_learner("cofima", cwp.our_backbone(inputs["vit"]), scenario, runtime, epochs=1, **params)
    learner.begin_session(scenario.sessions[0])
    learner.begin_session(scenario.sessions[1])
    with torch.no_grad():
        for i, head in enumerate(learner.heads):
            rows = slice(i * INCREMENT, (i + 1) * INCREMENT)
            head.weight.copy_(inputs["head_w"][rows])
            head.bias.copy_(inputs["head_b"][rows])
    learner.train()
    return learner


def our_neutral(learner: Any, values: list[torch.Tensor], head_w: torch.Tensor, head_b: torch.Tensor) -> Record:
    names = [n for n, _ in learner.backbone.model.named_parameters()]
    return {"vit": dict(zip(names, values)), "head_w": cwp.detached(head_w), "head_b": cwp.detached(head_b)}


def our_merge(inputs: Record, fisher_weighting: bool) -> Record:
    """``end_session`` of session 1 from the given theta*_0, F_0 (buffers) and F_1 (its Fisher pass)."""
    from pilot.learners import slca as slca_module
    from pilot.modules.merging import flatten

    learner = our_learner(inputs, fisher_weighting=fisher_weighting, scale_new_head_by_fisher=True)  # reference
    order = [n for n, _ in learner.backbone.model.named_parameters()]
    with torch.no_grad():
        learner.previous = flatten(inputs["theta0"]["vit"][n] for n in order)
        learner.aligned_weight[:KNOWN], learner.aligned_bias[:KNOWN] = (
            inputs["theta0"]["head_w"],
            inputs["theta0"]["head_b"],
        )
        if fisher_weighting:
            learner.fisher_backbone.copy_(flatten(inputs["fisher0"]["vit"][n] for n in order))
            learner.fisher_head_weight[:KNOWN] = inputs["fisher0"]["head_w"]
            learner.fisher_head_bias[:KNOWN] = inputs["fisher0"]["head_b"]
    if fisher_weighting:  # the Fisher pass yields the given F_1 (CoMA's pass computes nothing)
        f1 = inputs["fisher1"]
        given = flatten(f1["vit"][n] for n in order), f1["head_w"], f1["head_b"]
        learner.fisher = lambda *args: given
    starts: list = []

    def record_start(head: Any, *args: Any, **kwargs: Any) -> list:
        starts.append((cwp.detached(head.weight), cwp.detached(head.bias)))
        return []

    original, slca_module.align_classifier = slca_module.align_classifier, record_start
    try:
        batch = cwp.our_batch(inputs["images"], inputs["labels"], "train")
        learner.end_session(OneBatchSession(learner.scenario.sessions[1], [batch]))
    finally:
        slca_module.align_classifier = original
    params = [cwp.detached(p) for p in learner.backbone.model.parameters()]
    return our_neutral(learner, params, *starts[0])


def run_ours(inputs: Record) -> Record:
    learner = our_learner(inputs)
    names = {id(p): f"backbone.{n}" for n, p in learner.backbone.model.named_parameters()}
    for i, head in enumerate(learner.heads):
        names[id(head.weight)], names[id(head.bias)] = f"fc.heads.{i}.0.weight", f"fc.heads.{i}.0.bias"
    batch = cwp.our_batch(inputs["images"], inputs["labels"], "train")
    session = OneBatchSession(learner.scenario.sessions[1], [batch])
    losses: list = []
    steps: list = []
    learner.runtime.on_epoch = lambda epoch, loss, lr: losses.append(torch.tensor(loss))
    with recorded_steps(steps, names):
        learner.train_session(session)
    learner.runtime.on_epoch = None
    stage1 = {"loss": losses[0], "grads": neutral(steps[0]["grads"]), "lrs": steps[0]["lrs"]}
    stage1["trainable"] = learner.trainable_parameters or cwp.trainable_count(
        p for p in learner.parameters() if p.requires_grad
    )

    halves = [cwp.our_batch(x, y, "train") for x, y in split(inputs["images"], inputs["labels"], 2)]
    params, heads = learner.merged_parameters(), list(learner.heads)
    f_backbone, f_w, f_b = learner.fisher(OneBatchSession(session.info, halves), params, heads)
    sizes = [p.numel() for p in params]
    fisher = our_neutral(learner, [f.view(p.shape) for f, p in zip(f_backbone.split(sizes), params)], f_w, f_b)
    return {
        "meta": common.our_meta(),
        "stage1": stage1,
        "fisher": fisher,
        "merge": our_merge(inputs, fisher_weighting=True),
        "coma": our_merge(inputs, fisher_weighting=False),
    }


# ------------------------------------------------------------------------------------- compare
def at_nans(ours: Record, ref: Record) -> list[str]:
    """Ours where PILOT's Fisher merge is NaN (F_0 = F_1 = 0), against PILOT's plain interpolation there."""
    keys = sorted(ref["merge"]["vit"])
    merged = torch.cat([ref["merge"]["vit"][k].flatten() for k in keys] + [ref["merge"]["head_w"].flatten()])
    nan = ~torch.isfinite(merged)
    mine = torch.cat([ours["merge"]["vit"][k].flatten() for k in keys] + [ours["merge"]["head_w"].flatten()])
    coma = torch.cat([ref["coma"]["vit"][k].flatten() for k in keys] + [ref["coma"]["head_w"].flatten()])
    return diff_row(f"CoFiMA merge where PILOT is NaN ({int(nan.sum())}): ours vs PILOT's CoMA", mine[nan], coma[nan])


def vit_rows(label: str, ours: dict, ref: dict) -> list[list[str]]:
    """All backbone tensors as one vector, and the worst single tensor (relative L2)."""
    return common.grouped_rows(label, "backbone", ours, ref)


def report(ours: Record, ref: Record) -> str:
    rows = [diff_row("stage-1 loss", ours["stage1"]["loss"].reshape(()), ref["stage1"]["loss"].reshape(()))]
    rows += vit_rows("stage-1 gradient", ours["stage1"]["grads"]["vit"], ref["stage1"]["grads"]["vit"])
    for key in ("head_w", "head_b"):
        rows.append(
            diff_row(f"stage-1 gradient: new head {key}", ours["stage1"]["grads"][key], ref["stage1"]["grads"][key])
        )
    rows += vit_rows("Fisher", ours["fisher"]["vit"], ref["fisher"]["vit"])
    for key in ("head_w", "head_b"):
        rows.append(diff_row(f"Fisher: new head {key}", ours["fisher"][key][KNOWN:], ref["fisher"][key][KNOWN:]))
    for name in ("merge", "coma"):
        label = "CoFiMA merge" if name == "merge" else "CoMA merge (fisher_weighting=false)"
        rows += vit_rows(label, ours[name]["vit"], ref[name]["vit"])
        for key in ("head_w", "head_b"):
            rows.append(diff_row(f"{label}: old head {key}", ours[name][key][:KNOWN], ref[name][key][:KNOWN]))
            rows.append(diff_row(f"{label}: new head {key}", ours[name][key][KNOWN:], ref[name][key][KNOWN:]))
        if name == "merge":
            rows.append(at_nans(ours, ref))
    fisher_w = ours["fisher"]["head_w"][:KNOWN]
    clipped = torch.cat([v.flatten() for v in ref["fisher"]["vit"].values()]) == 1e-4
    notes = [
        f"{headline(ours, ref)}; CPU float32, random ViT-B/16.",
        f"stage-1 lrs: PILOT {ref['stage1']['lrs']}, ours {ours['stage1']['lrs']}; trainable parameters: "
        f"PILOT {ref['stage1']['trainable']}, ours {ours['stage1']['trainable']}.",
        f"Old head Fisher (not compared): PILOT max {float(ref['fisher']['head_w'][:KNOWN].abs().max()):.1e} "
        f"(the frozen head's stale p.grad; none in a fresh process), ours max {float(fisher_w.max()):.1e} "
        f"(gradient of the Fisher loss).",
        f"Fisher values at the clip 1e-4: {float(clipped.float().mean()):.1%} of PILOT's backbone values.",
    ]
    return common.diff_report(notes, rows)


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=8)
