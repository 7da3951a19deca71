"""Side-by-side check of our FOSTER learner against LAMDA-PILOT's ``models/foster.py`` (``FOSTERNet``).

Protocol as ``scripts/fidelity/cofima.py`` (whose helpers this script imports): CPU, float32, the same
seeded random ViT-B/16 weights on both sides (PILOT's ``timm.create_model`` redirected to them, nothing
downloaded), optimiser steps recorded and not applied (parameters stay as loaded). Setting:
``exps/foster.json`` (CIFAR B0Inc10, fixed memory of 20 per class), one epoch per stage, one batch of
8 images. Given values: theta_old (the session-0 backbone), its head (10 rows), f_new = theta_old + 1e-3
noise (the boosted backbone, so that the two branches differ), the teacher's heads, the student's new
rows, and the training images of each new class (ints 400-600: the class weights).

Compared, each side running its own code:

* **session 0** (PILOT ``_train`` at task 0; ours ``train_session``): CE loss, gradients of the backbone and
  the head, lr;
* **session-1 structure** (PILOT ``FOSTERNet.update_fc``; ours ``BoostedTeacher``): f_new = f_old, the
  teacher head's old block = the previous head (bias too);
* **boosting step** (PILOT ``_train`` at task 1 -> ``_feature_boosting``; ours ``FOSTER.boost``): the class
  weights w1, the three loss terms and their sum, the gradients of f_new, of ``fc`` and ``fe_fc``;
* **compression step** (PILOT ``_feature_compression``; ours ``FOSTER.compress``): w2, the balanced KD, the
  gradients of the student backbone and head, the lrs; trainable parameter counts of both stages;
* **after the session**: the teacher's and the student's logits, the teacher's features (memory, NME).

Variant ``az+wa`` repeats the session-1 part with ``oofc=az``, weight aligning of teacher and student
and ``wa_value=0.95``: the zeroed block, its zero gradient, the aligned heads and the logits.

Commands::

    .venv/bin/python scripts/fidelity/foster.py make-inputs --out /tmp/foster_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/foster.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/foster_fid --out /tmp/foster_fid/pilot.pt
    .venv/bin/python scripts/fidelity/foster.py ours --inputs /tmp/foster_fid --out /tmp/foster_fid/ours.pt
    .venv/bin/python scripts/fidelity/foster.py compare /tmp/foster_fid/pilot.pt /tmp/foster_fid/ours.pt
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import common
import torch
from cofima import pilot_args, shared_timm_weights, vit_rows
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row

BATCH = 8
VARIANTS = {  # PILOT's JSON keys -> ours
    "json": ({}, {}),
    "az+wa": (
        {"oofc": "az", "is_teacher_wa": True, "is_student_wa": True, "wa_value": 0.95},
        {"oofc": "az", "teacher_weight_align": True, "student_weight_align": True, "wa_value": 0.95},
    ),
}


# ---------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int) -> None:
    vit, gen = common.seeded_vit(seed)

    def uniform(*shape: int) -> torch.Tensor:  # PILOT's SimpleLinear init, U(-sqrt(3/in), sqrt(3/in))
        return (torch.rand(*shape, generator=gen) * 2 - 1) * (3 / shape[1]) ** 0.5

    fc_old, b_old = uniform(KNOWN, DIM), 0.01 * torch.randn(KNOWN, generator=gen)
    teacher_w = uniform(TOTAL, 2 * DIM)
    teacher_w[:KNOWN, :DIM] = fc_old
    teacher_b = torch.cat([b_old, 0.01 * torch.randn(INCREMENT, generator=gen)])
    inputs = {
        "meta": common.input_meta(seed),
        "vit": vit,
        "vit_new": {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "images": cwp.random_images(BATCH, gen),
        "labels0": torch.randint(0, KNOWN, (BATCH,), generator=gen),
        "labels": torch.tensor([1, 7, 10, 12, 15, 15, 18, 19]),
        "fc_old": fc_old,
        "b_old": b_old,
        "teacher_w": teacher_w,
        "teacher_b": teacher_b,
        "fe_w": uniform(TOTAL, DIM),
        "fe_b": 0.01 * torch.randn(TOTAL, generator=gen),
        "student_new": uniform(INCREMENT, DIM),
        "counts": torch.randint(400, 600, (INCREMENT,), generator=gen),
    }
    common.save_inputs(inputs, out)


@contextlib.contextmanager
def all_steps(store: list, names: dict[int, str], with_backbone: bool) -> Iterator[None]:
    """``SGD.step`` records every step's lrs, trainable count and named gradients, and changes nothing."""
    original = torch.optim.SGD.step

    def step(self: torch.optim.SGD, closure: Callable | None = None) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        grads = {names[id(p)]: cwp.detached(p.grad) for p in params if p.grad is not None}
        if not with_backbone:
            grads = {k: v for k, v in grads.items() if "backbone" not in k}
        count = sum(p.numel() for p in params)
        store.append({"lrs": [g["lr"] for g in self.param_groups], "count": count, "grads": grads})

    torch.optim.SGD.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]


def named(prefix: str, module: torch.nn.Module, names: dict[int, str]) -> None:
    names.update({id(p): f"{prefix}{n}" for n, p in module.named_parameters()})


# ---------------------------------------------------------------------------------- PILOT side
class Counts:
    """PILOT's ``data_manager.getlen(class)``: the new classes' training images."""

    def __init__(self, counts: torch.Tensor) -> None:
        self.counts = counts

    def getlen(self, index: int) -> int:
        return int(self.counts[index - KNOWN])


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    import models.foster as foster_module
    from torch.nn import functional as F
    from utils.inc_net import FOSTERNet

    out: Record = {"meta": common.pilot_meta(pilot_src)}
    images = inputs["images"]
    for variant, (pilot_keys, _) in VARIANTS.items():
        full = variant == "json"
        args = pilot_args(pilot_src, "foster", init_epochs=1, boosting_epochs=1, compression_epochs=1, **pilot_keys)
        with shared_timm_weights(inputs["vit"]):
            learner = foster_module.Learner(args)
            net = learner._network
            net.update_fc(KNOWN)
            with torch.no_grad():
                net.fc.weight.copy_(inputs["fc_old"])
                net.fc.bias.copy_(inputs["b_old"])
            names: dict[int, str] = {}
            named("", net, names)
            learner._network_module_ptr = net
            if full:  # session 0 (its _train: CE, SGD with init_lr / init_weight_decay)
                learner._cur_task, learner._total_classes = 0, KNOWN
                losses: list = []
                steps: list = []
                with cwp.captured_backward(losses), all_steps(steps, names, True):
                    learner._train(cwp.one_batch(images, inputs["labels0"]), cwp.one_batch(images, inputs["labels0"]))
                out["session 0"] = {"loss": losses[0], **neutral(steps[0])}
            # session 1: incremental_train's model updates, then its _train on the batch
            learner._cur_task, learner._known_classes, learner._total_classes = 1, KNOWN, TOTAL
            net.update_fc(TOTAL)
            structure = {
                "f_new - f_old": max(
                    float((a - b).abs().max())
                    for a, b in zip(net.backbones[1].parameters(), net.backbones[0].parameters())
                ),
                "old block - previous head": float((net.fc.weight[:KNOWN, :DIM] - inputs["fc_old"]).abs().max()),
                "old bias - previous bias": float((net.fc.bias[:KNOWN] - inputs["b_old"]).abs().max()),
            }
            for p in [*net.backbones[0].parameters(), *net.oldfc.parameters()]:
                p.requires_grad = False
            with torch.no_grad():
                net.backbones[1].load_state_dict(inputs["vit_new"])
                net.fc.weight.copy_(inputs["teacher_w"])
                net.fc.bias.copy_(inputs["teacher_b"])
                net.fe_fc.weight.copy_(inputs["fe_w"])
                net.fe_fc.bias.copy_(inputs["fe_b"])
            names = {}
            named("teacher.", net, names)
            learner.data_manager = Counts(inputs["counts"])
            copy_fc = FOSTERNet.copy_fc

            def student_init(self: Any, fc: Any) -> None:  # the student's new rows: the given ones
                copy_fc(self, fc)
                with torch.no_grad():
                    self.fc.weight[KNOWN:] = inputs["student_new"]
                    self.fc.bias[KNOWN:] = 0
                named("student.", self, names)

            weights: list = []
            ces: list = []
            kds: list = []
            bkds: list = []
            losses, steps = [], []
            FOSTERNet.copy_fc = student_init
            try:
                batch = cwp.one_batch(images, inputs["labels"])
                for stage in ("_feature_boosting", "_feature_compression"):
                    setattr(learner, stage, record_weights(learner, getattr(learner, stage), weights))
                with cwp.captured_backward(losses), all_steps(steps, names, full), cwp.spy(learner, "BKD", bkds):
                    with cwp.spy(F, "cross_entropy", ces), cwp.spy(foster_module, "_KD_loss", kds):
                        learner._train(batch, batch)
            finally:
                FOSTERNet.copy_fc = copy_fc
            snet = learner._snet
            with torch.no_grad():
                after = {
                    "teacher logits": cwp.detached(net(images)["logits"]),
                    "student logits": cwp.detached(snet(images)["logits"]),
                    "teacher features": cwp.detached(net.extract_vector(images)),
                    "teacher fc": cwp.detached(net.fc.weight),
                    "student fc": cwp.detached(snet.fc.weight),
                }
            out[variant] = {
                "structure": structure,
                "w1": weights[0],
                "w2": weights[1],
                "boost": {"clf": ces[0], "fe": ces[1], "kd": kds[0], "loss": losses[0], **neutral(steps[0])},
                "compress": {"bkd": bkds[0], "loss": losses[1], **neutral(steps[1])},
                "after": after,
            }
    return out


def record_weights(learner: Any, stage: Callable, store: list) -> Callable:
    def wrapper(*args: Any) -> Any:
        store.append(cwp.detached(learner.per_cls_weights))
        return stage(*args)

    return wrapper


def neutral(step: Record) -> Record:
    """Gradients under neutral names: ``vit`` (the trained backbone, timm keys) and the heads (``fc.weight``...)."""
    grads: dict = {"vit": {}}
    for name, grad in step["grads"].items():
        name = name.split(".", 1)[1] if name.startswith(("teacher.", "student.")) else name
        if name.startswith("backbones."):
            grads["vit"][name.split(".", 2)[2]] = grad
        else:
            grads[name] = grad
    return {"lrs": step["lrs"], "count": step["count"], "grads": grads}


# ----------------------------------------------------------------------------------- our side
class OneBatch:
    """What FOSTER reads of a session: the replay stream (one batch) and the new classes' image counts."""

    def __init__(self, info: Any, batch: Any, counts: torch.Tensor) -> None:
        self.info, self.batch, self.counts = info, batch, counts
        self.pipeline = self

    def replay_batches(self, batch_size: int, memory_ids: Any) -> list:
        return [self.batch]

    def indices(self, split: str, classes: range) -> range:
        return range(int(self.counts[classes.start - KNOWN]))


def run_ours(inputs: Record) -> Record:
    from pilot.api import make_learner
    from pilot.data.scenario import make_scenario
    from pilot.learners import foster as foster_module
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    out: Record = {"meta": common.our_meta()}
    images = inputs["images"]
    for variant, (_, ours_keys) in VARIANTS.items():
        full = variant == "json"
        epochs = {"init_epochs": 1, "epochs": 1, "compression_epochs": 1}
        learner = make_learner("foster", cwp.our_backbone(inputs["vit"]), scenario, runtime, **epochs, **ours_keys)
        learner.begin_session(scenario.sessions[0])
        with torch.no_grad():
            learner.head.weight.copy_(inputs["fc_old"])
            learner.head.bias.copy_(inputs["b_old"])
        names: dict[int, str] = {}
        named("backbones.0.", learner.backbone.model, names)
        named("fc.", learner.head, names)
        learner.train()
        if full:
            losses: list = []
            steps: list = []
            runtime.on_epoch = lambda epoch, loss, lr: losses.append(torch.tensor(loss))
            with all_steps(steps, names, True):
                learner.train_session(
                    OneBatch(scenario.sessions[0], cwp.our_batch(images, inputs["labels0"], "train"), None)
                )
            out["session 0"] = {"loss": losses[0], **neutral(steps[0])}
            runtime.on_epoch = None
        learner.begin_session(scenario.sessions[1])
        with torch.no_grad():
            learner.head.weight[KNOWN:] = inputs["student_new"]
        names = {}
        named("student.backbones.0.", learner.backbone.model, names)
        named("student.fc.", learner.head, names)
        structure: dict = {}
        boost = learner.boost

        def given_teacher(session: Any, weights: torch.Tensor) -> None:
            teacher = learner.teacher
            structure["f_new - f_old"] = max(
                float((a - b).abs().max())
                for a, b in zip(teacher.new_backbone.parameters(), teacher.old_backbone.parameters())
            )
            structure["old block - previous head"] = float(
                (teacher.fc.weight[:KNOWN, :DIM] - inputs["fc_old"]).abs().max()
            )
            structure["old bias - previous bias"] = float((teacher.fc.bias[:KNOWN] - inputs["b_old"]).abs().max())
            with torch.no_grad():
                teacher.new_backbone.model.load_state_dict(inputs["vit_new"])
                teacher.fc.weight.copy_(inputs["teacher_w"])
                teacher.fc.bias.copy_(inputs["teacher_b"])
                teacher.fe_fc.weight.copy_(inputs["fe_w"])
                teacher.fe_fc.bias.copy_(inputs["fe_b"])
            named("teacher.backbones.1.", teacher.new_backbone.model, names)
            named("teacher.fc.", teacher.fc, names)
            named("teacher.fe_fc.", teacher.fe_fc, names)
            boost(session, weights)

        weights: list = []
        parts: list = []
        bkds: list = []
        losses, steps = [], []
        learner.boost = given_teacher
        session = OneBatch(scenario.sessions[1], cwp.our_batch(images, inputs["labels"], "train"), inputs["counts"])
        runtime.on_epoch = lambda epoch, loss, lr: losses.append(torch.tensor(loss))
        with all_steps(steps, names, full), cwp.spy(foster_module, "class_balanced_weights", weights):
            with cwp.spy(learner, "boosting_losses", parts, fn=lambda d: {k: cwp.detached(v) for k, v in d.items()}):
                with cwp.spy(learner, "compression_loss", bkds):
                    learner.train_session(session)
        runtime.on_epoch = None
        learner.eval()
        teacher = learner.teacher
        with torch.no_grad():
            after = {
                "teacher logits": cwp.detached(teacher(images)[0]),
                "student logits": cwp.detached(learner.head(learner.backbone(images))),
                "teacher features": cwp.detached(learner.exemplar_features(images)),
                "teacher fc": cwp.detached(teacher.fc.weight),
                "student fc": cwp.detached(learner.head.weight),
            }
        boost_terms = {**parts[0], "loss": losses[0]}
        out[variant] = {
            "structure": structure,
            "w1": weights[0],
            "w2": weights[1],
            "boost": {**boost_terms, **neutral(steps[0])},
            "compress": {"bkd": bkds[0], "loss": losses[1], **neutral(steps[1])},
            "after": after,
        }
    return out


# ------------------------------------------------------------------------------------- compare
def scalar(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).double().reshape(())


def step_rows(label: str, ours: Record, ref: Record, heads: tuple[str, ...]) -> list[list[str]]:
    """Rows for the gradients ``ours``/``ref`` (neutral names) of one step: backbone (if recorded) and heads."""
    rows = vit_rows(f"{label}: gradient", ours["vit"], ref["vit"]) if ours["vit"] and ref["vit"] else []
    for head in heads:
        rows.append(diff_row(f"{label}: gradient of `{head}`", ours[head], ref[head]))
    return rows


def report(ours: Record, ref: Record) -> str:
    rows = [diff_row("session 0: loss", scalar(ours["session 0"]["loss"]), scalar(ref["session 0"]["loss"]))]
    rows += step_rows("session 0", ours["session 0"]["grads"], ref["session 0"]["grads"], ("fc.weight", "fc.bias"))
    notes = [
        f"{common.headline(ours, ref)}; CPU float32, random ViT-B/16.",
        f"session 0: lrs PILOT {ref['session 0']['lrs']}, ours {ours['session 0']['lrs']}; trainable PILOT "
        f"{ref['session 0']['count']}, ours {ours['session 0']['count']}.",
    ]
    for variant in VARIANTS:
        o, r = ours[variant], ref[variant]
        notes.append(f"{variant}: structure PILOT {r['structure']}, ours {o['structure']}.")
        notes.append(
            f"{variant}: lrs boosting PILOT {r['boost']['lrs']}, ours {o['boost']['lrs']}; compression PILOT "
            f"{r['compress']['lrs']}, ours {o['compress']['lrs']}; trainable boosting PILOT {r['boost']['count']}, "
            f"ours {o['boost']['count']}; compression PILOT {r['compress']['count']}, ours {o['compress']['count']}."
        )
        block = [float(x["boost"]["grads"]["fc.weight"][KNOWN:, :DIM].abs().max()) for x in (r, o)]
        zeroed = [float(x["after"]["teacher fc"][KNOWN:, :DIM].abs().max()) for x in (r, o)]
        notes.append(
            f"{variant}: new classes x f_old block of the teacher head: max |gradient| PILOT {block[0]:.1e}, ours "
            f"{block[1]:.1e}; max |weight| after the session PILOT {zeroed[0]:.1e}, ours {zeroed[1]:.1e}."
        )
        rows.append(diff_row(f"{variant}: class weights w1 (beta1)", o["w1"], r["w1"]))
        rows.append(diff_row(f"{variant}: class weights w2 (beta2)", o["w2"], r["w2"]))
        for term in ("clf", "fe", "kd", "loss"):
            rows.append(diff_row(f"{variant}: boosting {term}", scalar(o["boost"][term]), scalar(r["boost"][term])))
        heads = ("fc.weight", "fc.bias", "fe_fc.weight", "fe_fc.bias")
        rows += step_rows(f"{variant}: boosting", o["boost"]["grads"], r["boost"]["grads"], heads)
        for term in ("bkd", "loss"):
            rows.append(
                diff_row(f"{variant}: compression {term}", scalar(o["compress"][term]), scalar(r["compress"][term]))
            )
        heads = ("fc.weight", "fc.bias")
        rows += step_rows(f"{variant}: compression", o["compress"]["grads"], r["compress"]["grads"], heads)
        for key in ("teacher fc", "student fc", "teacher logits", "student logits", "teacher features"):
            rows.append(diff_row(f"{variant}: {key} after the session", o["after"][key], r["after"][key]))
    return common.diff_report(notes, rows)


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report)
