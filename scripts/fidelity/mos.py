"""Side-by-side check of our MOS learner against LAMDA-PILOT's ``models/mos.py`` + ``backbone/vit_mos.py``.

Protocol (as ``scripts/compare_with_pilot.py``, whose helpers this file imports)
------------------------------------------------------------------------------
CPU, float32, the same seeded random ViT-B/16 weights (timm key names), the same 10 images in [0, 1],
the same adapter / head / class-mean / prototype values on both sides. PILOT's ``vit_base_patch16_224_mos``
asks timm for pretrained weights: ``timm.create_model`` is patched in the PILOT process to build the model
with ``pretrained=False`` and load the shared weights, so PILOT's own q/k/v split runs on them. The
setting is ``exps/mos.json`` (CIFAR, B0Inc5 over 100 classes; ``adapter_momentum`` 0.1, ``reg`` 0.1),
with adapter dropout set to 0 on both sides (PILOT hard-codes 0.1; dropout masks cannot be shared).
Ours runs with ``adapter_drift=true`` (the reference's in-place forward merges).

Cases (each side with its own code path; one batch = 2 images of each of the session's 5 classes):

* ``train s0``: session 0, one optimiser step (PILOT ``_init_train`` on a one-batch loader, its own
  SGD: adapter lr 0.03, head 0.003, momentum 0.9, wd 5e-4; ours ``MOS.train_session``). Recorded: the
  loss the loop calls ``backward`` on, the orthogonality term, the gradients of the adapter and the
  head (read in an optimiser step pre-hook), the adapter and head after the step.
* ``train s2``: session 2 with snapshots S_0, S_1 (PILOT: ``adapter_update`` after loading each;
  ours: ``adapters[t]`` + ``history.record``), stored means of classes 0-9, a current adapter C.
  Same records: here the loss has old classes masked and the means in the orthogonality term, and
  the adapter after the step includes the forward merges and the post-step merge.
* ``stats s2``: right after it, the class-statistics pass of classes 10-14 (PILOT ``_compute_mean``;
  ours ``statistics_features`` + ``ClassGaussians.update``): means, covariances, the current adapter
  after the pass (drifted by the forward merges).
* ``eval s2``: fresh values S_0, S_1, S_2, head, prototypes of classes 0-14; PILOT ``_eval_cnn`` on
  the batch (one test batch) vs our ``predict``: prototype logits, final scores (the tensor PILOT
  ranks with ``topk``), predictions, and S_1, S_2 after the evaluation (drifted).

Commands::

    .venv/bin/python scripts/fidelity/mos.py make-inputs --out /tmp/fid_mos
    /work/pilot_ref_env/bin/python scripts/fidelity/mos.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/fid_mos --out /tmp/fid_mos/pilot.pt
    .venv/bin/python scripts/fidelity/mos.py ours --inputs /tmp/fid_mos --out /tmp/fid_mos/ours.pt
    .venv/bin/python scripts/fidelity/mos.py compare /tmp/fid_mos/pilot.pt /tmp/fid_mos/ours.pt \\
        --markdown /tmp/fid_mos/table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import common
import torch
from common import Record, cwp

NUM_CLASSES, INCREMENT, SESSIONS, DIM, DEPTH, RANK = 100, 5, 20, 768, 12, 16
PER_CLASS = 2  # images per class in the batch


# --------------------------------------------------------------------------------------- make-inputs
def adapter_values(gen: torch.Generator) -> torch.Tensor:
    """One adapter set in the neutral layout: per block down.weight, down.bias, up.weight, up.bias, flat."""
    parts = []
    for _ in range(DEPTH):
        parts += [0.05 * torch.randn(RANK * DIM, generator=gen), 0.05 * torch.randn(RANK, generator=gen)]
        parts += [0.2 * torch.randn(DIM * RANK, generator=gen), 0.05 * torch.randn(DIM, generator=gen)]
    return torch.cat(parts)


def head_values(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "head_w": 0.02 * torch.randn(NUM_CLASSES, DIM, generator=gen),
        "head_b": 0.01 * torch.randn(NUM_CLASSES, generator=gen),
    }


def eval_rows(vit: torch.nn.Module, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Head and prototype rows of classes 0-14 that tell the images apart: unit-norm batch-centred
    features of the plain ViT (random features share a large common part), image ``c % 10`` for the
    head row of class c and a shuffled image for its prototype, so that retrieval paths vary."""
    with torch.no_grad():
        feats = vit(images)
    centred = torch.nn.functional.normalize(feats - feats.mean(0), dim=1)
    rows = 3 * INCREMENT
    head_w = 0.02 * torch.randn(NUM_CLASSES, DIM, generator=gen)
    head_w[:rows] = 5 * centred[torch.arange(rows) % len(images)] / feats.std(0).norm()
    shuffled = torch.randperm(len(images), generator=gen)
    prototypes = centred[shuffled[torch.arange(rows) % len(images)]] + 0.1 * torch.randn(rows, DIM, generator=gen)
    return {"head_w": head_w, "head_b": torch.zeros(NUM_CLASSES), "prototypes": prototypes}


def make_inputs(out: Path, seed: int) -> None:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = {t: torch.arange(t * INCREMENT, (t + 1) * INCREMENT).repeat_interleave(PER_CLASS) for t in (0, 2)}
    images = cwp.random_images(PER_CLASS * INCREMENT, gen)
    inputs = {
        "meta": common.input_meta(seed),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "images": images,
        "labels": labels,
        "train s0": {"current": adapter_values(gen), **head_values(gen)},
        "train s2": {
            "snapshots": [adapter_values(gen) for _ in range(2)],
            "current": adapter_values(gen),
            "means": torch.randn(2 * INCREMENT, DIM, generator=gen),
            **head_values(gen),
        },
        "eval s2": {"snapshots": [adapter_values(gen) for _ in range(3)], **eval_rows(vit, images, gen)},
    }
    common.save_inputs(inputs, out)


# ----------------------------------------------------------------------------------------- shared
def flat(params: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def load_flat(params: list[torch.nn.Parameter], values: torch.Tensor, swap: bool = False) -> None:
    """Write ``values`` (neutral layout) into ``params``; ``swap``: replace ``.data`` (new storage, as
    PILOT's own merges do; in-place copies would also change PILOT's prefix sums, which alias it)."""
    offset = 0
    for p in params:
        chunk = values[offset : offset + p.numel()].view_as(p).clone()
        if swap:
            p.data = chunk
        else:
            with torch.no_grad():
                p.copy_(chunk)
        offset += p.numel()


class StepRecorder:
    """Gradients of every parameter group, read just before each optimiser step (global hook)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def __enter__(self) -> "StepRecorder":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        def hook(opt: torch.optim.Optimizer, *_: Any) -> None:
            self.grads.append([flat(p.grad for p in g["params"] if p.grad is not None) for g in opt.param_groups])

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------ PILOT side
def pilot_learner(pilot_src: Path, inputs: dict[str, Any]) -> Any:
    import timm
    from models.mos import Learner

    original = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        model = original(name, pretrained=False, **kwargs)
        cwp.load_vit(model, inputs["vit"], ("head.",))
        return model

    timm.create_model = offline
    try:
        args = json.loads((pilot_src / "exps" / "mos.json").read_text())
        args.update(device=["cpu"], nb_classes=NUM_CLASSES, tuned_epoch=1, crct_epochs=0)
        learner = Learner(args)
    finally:
        timm.create_model = original
    vit = learner._network.backbone
    for adapter in vit.cur_adapter:
        adapter.dropout = 0.0
    return learner


def pilot_session(learner: Any, t: int, values: dict[str, Any]) -> None:
    """Session t's counters, snapshots S_0..S_{t-1} (through PILOT's adapter_update), head."""
    vit = learner._network.backbone
    learner._cur_task, learner._known_classes, learner._total_classes = t, t * INCREMENT, (t + 1) * INCREMENT
    learner.cls2task = {c: c // INCREMENT for c in range((t + 1) * INCREMENT)}
    for snapshot in values.get("snapshots", [])[:t]:
        load_flat(list(vit.cur_adapter.parameters()), snapshot, swap=True)
        vit.adapter_update()
    if "current" in values:
        load_flat(list(vit.cur_adapter.parameters()), values["current"], swap=True)
    load_flat([vit.head.weight, vit.head.bias], torch.cat([values["head_w"].reshape(-1), values["head_b"]]), True)


def pilot_train(learner: Any, images: torch.Tensor, labels: torch.Tensor) -> Record:
    vit = learner._network.backbone
    optimizer = learner.get_optimizer(vit)
    scheduler = learner.get_scheduler(optimizer)
    losses, orth = [], []
    with cwp.captured_backward(losses), cwp.spy(learner, "orth_loss", orth), StepRecorder() as steps:
        learner._init_train(cwp.one_batch(images, labels), None, optimizer, scheduler)
    grads = steps.grads[0]
    return {
        "loss": losses[0],
        "orth": orth[0],
        "grad adapter": grads[0],  # group 0 = 'adapter' params with a gradient: the current adapter
        "grad head": grads[1],
        "adapter after step": flat(vit.cur_adapter.parameters()),
        "head after step": flat([vit.head.weight, vit.head.bias]),
    }


class PilotIndexDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return i, self.images[i], int(self.labels[i])


class PilotDataManager:
    """``get_dataset(classes, source, mode, ret_data=True)`` of the batch's images of those classes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def get_dataset(self, classes: Any, source: str, mode: str, ret_data: bool = False) -> Any:
        keep = torch.isin(self.labels, torch.as_tensor(classes))
        dataset = PilotIndexDataset(self.images[keep], self.labels[keep])
        return (None, self.labels[keep], dataset) if ret_data else dataset


def run_pilot(pilot_src: Path, inputs: dict[str, Any]) -> Record:
    sys.path.insert(0, str(pilot_src))
    import models.mos

    loader = torch.utils.data.DataLoader
    models.mos.DataLoader = lambda dataset, batch_size, shuffle, num_workers: loader(dataset, batch_size, shuffle)
    images, records = inputs["images"], {}
    learner = pilot_learner(pilot_src, inputs)
    vit = learner._network.backbone
    count = sum(p.numel() for p in vit.cur_adapter.parameters()) + sum(p.numel() for p in vit.head.parameters())
    pilot_session(learner, 0, inputs["train s0"])
    records["train s0"] = pilot_train(learner, images, inputs["labels"][0])

    learner = pilot_learner(pilot_src, inputs)
    vit = learner._network.backbone
    values = inputs["train s2"]
    pilot_session(learner, 2, values)
    learner.cls_mean = {c: values["means"][c].clone() for c in range(2 * INCREMENT)}
    records["train s2"] = pilot_train(learner, images, inputs["labels"][2])
    vit.adapter_update()  # as PILOT's _train after _init_train
    learner.data_manager = PilotDataManager(images, inputs["labels"][2])
    learner._compute_mean(vit)
    new = range(2 * INCREMENT, 3 * INCREMENT)
    records["stats s2"] = {
        "means": torch.stack([learner.cls_mean[c] for c in new]).float(),
        "covariances": torch.stack([learner.cls_cov[c] for c in new]).float(),
        "adapter after pass": flat(vit.cur_adapter.parameters()),
    }

    learner = pilot_learner(pilot_src, inputs)
    net, values = learner._network, inputs["eval s2"]
    pilot_session(learner, 3, values)  # snapshots S_0..S_2 through adapter_update
    learner._cur_task, learner._known_classes, learner._total_classes = 2, 2 * INCREMENT, 3 * INCREMENT
    learner.cls2task = {c: c // INCREMENT for c in range(3 * INCREMENT)}
    net.update_fc(3 * INCREMENT)
    with torch.no_grad():
        net.fc.weight.copy_(values["prototypes"])
    proto, ranked = [], []
    original_topk = torch.topk

    def topk(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        ranked.append(cwp.detached(x))
        return original_topk(x, *args, **kwargs)

    torch.topk = topk  # type: ignore[assignment]
    try:
        with cwp.spy(net, "forward_orig", proto, fn=lambda o: cwp.detached(o["logits"])):
            predicted, _ = learner._eval_cnn(cwp.one_batch(images, inputs["labels"][2]))
    finally:
        torch.topk = original_topk  # type: ignore[assignment]
    records["eval s2"] = {
        "prototype logits": proto[0][:, : 3 * INCREMENT],
        "scores": ranked[0],
        "predictions": torch.as_tensor(predicted[:, 0]),
        **{f"S_{t} after eval": flat(net.backbone.adapter_list[t].parameters()) for t in range(3)},
    }
    meta = common.pilot_meta(pilot_src)
    return {"meta": meta, "cases": records, "trainable_params": count}


# -------------------------------------------------------------------------------------- our side
class FakePipeline:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def batches(self, split: str, classes: range, batch_size: int, *args: Any, **kwargs: Any) -> list[Any]:
        keep = (self.labels >= classes.start) & (self.labels < classes.stop)
        return [cwp.our_batch(self.images[keep], self.labels[keep], "train")]


class FakeSession:
    """What ``MOS.train_session`` / ``statistics_features`` read of a session."""

    def __init__(self, info: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.info, self.pipeline = info, FakePipeline(images, labels)
        self.batch = cwp.our_batch(images, labels, "train")

    def train_batches(self, batch_size: int) -> list[Any]:
        return [self.batch]


def our_learner(inputs: dict[str, Any], sessions: int, values: dict[str, Any]) -> Any:
    from pilot.data.scenario import make_scenario
    from pilot.runtime import make_runtime

    runtime = make_runtime(device="cpu", progress=False, channels_last=False)
    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT)
    from pilot.api import make_learner

    learner = make_learner(
        "mos", cwp.our_backbone(inputs["vit"]), scenario, runtime, epochs=1, adapter_dropout=0.0, ca_epochs=0
    )
    for t in range(sessions):
        learner.begin_session(scenario.sessions[t])
    for t, snapshot in enumerate(values.get("snapshots", [])[:sessions]):
        if t < sessions - 1 or "current" not in values:
            load_flat(list(learner.adapters[t].parameters()), snapshot)
            learner.history.record(t, learner.adapters[t])
    if "current" in values:
        load_flat(list(learner.current.parameters()), values["current"])
    load_flat(list(learner.head.parameters()), torch.cat([values["head_w"].reshape(-1), values["head_b"]]))
    return learner, scenario


def our_train(learner: Any, scenario: Any, t: int, images: torch.Tensor, labels: torch.Tensor) -> Record:
    from pilot.learners import mos as mos_module

    losses, orth = [], []
    learner.train()
    with cwp.captured_backward(losses), cwp.spy(mos_module, "orthogonality_loss", orth), StepRecorder() as steps:
        learner.train_session(FakeSession(scenario.sessions[t], images, labels))
    grads = steps.grads[0]
    return {
        "loss": losses[0],
        "orth": 0.1 * orth[0],  # PILOT's orth_loss returns reg x the term
        "grad adapter": grads[0],
        "grad head": grads[1],
        "adapter after step": flat(learner.current.parameters()),
        "head after step": flat(learner.head.parameters()),
    }


def our_eval(inputs: dict[str, Any], drift: bool = True) -> tuple[Record, list[int]]:
    from pilot.learners import mos as mos_module

    values = inputs["eval s2"]
    learner, scenario = our_learner(inputs, 3, values)
    learner.adapter_drift = drift
    with torch.no_grad():
        learner.prototypes.weight.copy_(values["prototypes"])
    learner.eval()
    proto: list = []
    scored: list[int] = []  # samples scored in each round of the self-refined retrieval
    refine = mos_module.self_refined_logits

    def counting(first: Any, logits_under: Any, *args: Any) -> Any:
        return refine(first, lambda rows, tasks: scored.append(len(rows)) or logits_under(rows, tasks), *args)

    mos_module.self_refined_logits = counting
    try:
        with cwp.forward_outputs(learner.prototypes, proto, cwp.detached):
            scores = learner.predict(cwp.our_batch(images := inputs["images"], inputs["labels"][2], "test"))
    finally:
        mos_module.self_refined_logits = refine
    assert len(images) == len(scores)
    record = {
        "prototype logits": proto[0],
        "scores": cwp.detached(scores),
        "predictions": scores.argmax(dim=1),
        **{f"S_{t} after eval": flat(learner.adapters[t].parameters()) for t in range(3)},
    }
    return record, scored


def our_train_s2(inputs: dict[str, Any], drift: bool = True) -> tuple[Record, Record]:
    values, images, labels = inputs["train s2"], inputs["images"], inputs["labels"][2]
    learner, scenario = our_learner(inputs, 3, values)
    learner.adapter_drift = drift
    with torch.no_grad():
        learner.stats.means[: 2 * INCREMENT] = values["means"].double()
    train = our_train(learner, scenario, 2, images, labels)
    feats, new_labels = learner.statistics_features(FakeSession(scenario.sessions[2], images, labels))
    learner.stats.update(feats, new_labels, scenario.sessions[2].new_classes)
    new = slice(2 * INCREMENT, 3 * INCREMENT)
    stats = {
        "means": learner.stats.means[new].float(),
        "covariances": learner.stats.covs[new].float(),
        "adapter after pass": flat(learner.current.parameters()),
    }
    return train, stats


def run_ours(inputs: dict[str, Any]) -> Record:
    learner, scenario = our_learner(inputs, 1, inputs["train s0"])
    records = {"train s0": our_train(learner, scenario, 0, inputs["images"], inputs["labels"][0])}
    count = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    records["train s2"], records["stats s2"] = our_train_s2(inputs)
    records["eval s2"], scored = our_eval(inputs)
    # the paper's merging (adapter_drift=false) against the same PILOT records: how far the drift moves things
    records["train s2 [drift=false]"], records["stats s2 [drift=false]"] = our_train_s2(inputs, drift=False)
    records["eval s2 [drift=false]"], _ = our_eval(inputs, drift=False)
    meta = common.our_meta()
    return {"meta": meta, "cases": records, "trainable_params": count, "scored_per_round": scored}


# ---------------------------------------------------------------------------------------- compare
def report(ours: Record, ref: Record) -> str:
    rows = []
    for case, record in ours["cases"].items():
        for key, value in record.items():
            reference = ref["cases"][case.split(" [")[0]][key]
            if key == "predictions":
                same = int((value == reference).sum())
                rows.append([case, key, "x".join(map(str, value.shape)), f"{same}/{len(value)} same", "-", "-"])
                continue
            d = cwp.tensor_diff(value, reference)
            rows.append([case, key, d["shape"], cwp.fmt(d["max_abs"]), cwp.fmt(d["ref_max"]), cwp.fmt(d["rel"])])
    return "\n".join(
        [
            f"{common.headline(ours, ref, 40)}; CPU, float32; adapter_drift=true.",
            "",
            cwp.table(["case", "quantity", "shape", "max abs diff", "max abs (PILOT)", "rel L2"], rows),
            "",
            f"Trainable parameters (current adapter + head): PILOT {ref['trainable_params']:,}, "
            f"ours {ours['trainable_params']:,}. Self-refined retrieval (ours, eval s2): samples scored in each "
            f"round {ours['scored_per_round']}. Rows [drift=false]: ours with the paper's merging vs PILOT.",
        ]
    )


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report)
