"""Side-by-side check of our DUCT learner against LAMDA-PILOT's ``models/duct.py``.

Protocol as ``scripts/fidelity/cofima.py`` (CPU, float32, the same random ViT-B/16 weights as theta_0
on both sides, PILOT's ``timm.create_model`` redirected to them, optimiser steps recorded and not
applied). Setting: ``exps/duct.json`` (CIFAR B0Inc10) at session 1; the batch holds one image of
each class 10-19. PILOT's POT (``ot``) must be installed in its environment. LAMDA-PILOT's DUCT calls
``self._compute_class_mean``, which its ``BaseLearner`` lacks: the theta_0 class means are therefore
taken with PILOT's ``_extract_vectors`` and the official ``_compute_class_mean`` logic (mean of the
features of each class, test images) and given to its learner.

Compared, each side running its own code:

* **training step** (PILOT ``_train(mode='train')``, ``epochs=1``; ours ``DUCT.train_session``) with
  the classifier as each side grows it (``new_row_init=zeros``: 10 drawn rows, 10 zero rows; the loss
  gradient of the zero rows is ~1e12) and with given rows and sigma: loss, gradients of the backbone,
  the classifier rows and sigma, the lrs of the groups;
* **retraining step** (PILOT ``_train(mode='retrain')`` with ``epc_re=1``; ours
  ``DUCT.retrain_classifier``): loss, gradients of the classifier rows and sigma, lr;
* **learning rates per epoch** of the 10 training and 5 retraining epochs (one image per epoch);
* **theta_0 class means** of the 10 new classes;
* **backbone merge** from given theta_0, theta*_0 = theta_0 + D_prev and theta_1 = theta_0 + D_1
  (PILOT ``_stage1_merge_backbone``; ours ``DUCT.merge_backbone``): s_1 and the merged backbone;
* **classifier consolidation** from given class means (three scales of distances: ~0.1, ~5 and
  ~30, the last far above ``ot_reg`` x 745, where exp(-cost/reg) underflows) and given rows (PILOT
  ``_stage2_transport_classifier``; ours ``DUCT.consolidate_classifier``): the plan and the rows.

Commands::

    .venv/bin/python scripts/fidelity/duct.py make-inputs --out /tmp/duct_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/duct.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/duct_fid --out /tmp/duct_fid/pilot.pt
    .venv/bin/python scripts/fidelity/duct.py ours --inputs /tmp/duct_fid --out /tmp/duct_fid/ours.pt
    .venv/bin/python scripts/fidelity/duct.py compare /tmp/duct_fid/pilot.pt /tmp/duct_fid/ours.pt
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import common
import torch
from cofima import OneBatchSession, pilot_args, recorded_steps, shared_timm_weights, vit_rows
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row

SCALES = (0.003, 0.13, 0.8)  # class-mean spreads: pairwise distances ~0.1, ~5, ~30


# ---------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int) -> None:
    vit, gen = common.seeded_vit(seed)
    labels = KNOWN + torch.randperm(INCREMENT, generator=gen)
    inputs = {
        "meta": common.input_meta(seed),
        "vit": vit,
        "images": cwp.random_images(INCREMENT, gen),
        "labels": labels,
        "fc_weight": (torch.rand(TOTAL, DIM, generator=gen) * 2 - 1) / DIM**0.5,
        "fc_sigma": torch.tensor([1.5]),
        "delta_prev": {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "delta_1": {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "ptm_means": torch.randn(TOTAL, DIM, generator=gen, dtype=torch.float64),
        "means": {s: s * torch.randn(TOTAL, DIM, generator=gen, dtype=torch.float64) for s in SCALES},
    }
    common.save_inputs(inputs, out)


def step_record(losses: list, steps: list) -> Record:
    grads = steps[0]["grads"]
    return {
        "loss": torch.as_tensor(losses[0]).reshape(()),
        "vit": {k[len("backbone.") :]: v for k, v in grads.items() if k.startswith("backbone.")},
        "fc_weight": grads["fc.weight"],
        "fc_sigma": grads["fc.sigma"],
        "lrs": steps[0]["lrs"],
    }


# ---------------------------------------------------------------------------------- PILOT side
class ClassData:
    """PILOT's ``data_manager.get_dataset`` for the given images: ``(index, image, label)`` of some classes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def get_dataset(self, classes: Any, source: str = "train", mode: str = "train") -> list:
        keep = [i for i, y in enumerate(self.labels.tolist()) if y in set(int(c) for c in classes)]
        return [(i, self.images[i], self.labels[i]) for i in keep]


@contextlib.contextmanager
def recorded_plans(module: Any, store: list) -> Iterator[None]:
    """``module.sinkhorn`` (POT's) appends the plans it returns to ``store``."""
    original = module.sinkhorn

    def sinkhorn(*args: Any, **kwargs: Any) -> Any:
        plan = original(*args, **kwargs)
        store.append(cwp.detached(plan).double())
        return plan

    module.sinkhorn = sinkhorn
    try:
        yield
    finally:
        module.sinkhorn = original


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    import numpy as np
    import ot
    from models.duct import Learner
    from utils.toolkit import state_dict_to_vector

    with shared_timm_weights(inputs["vit"]):
        learner = Learner(pilot_args(pilot_src, "duct", epochs=1, epc_re=1))
    net = learner._network
    net.update_fc(KNOWN)
    net.update_fc(TOTAL)  # rows 10-19: zeros
    learner._cur_task, learner._known_classes, learner._total_classes = 1, KNOWN, TOTAL
    names = {id(p): n for n, p in net.named_parameters()}
    images, labels = inputs["images"], inputs["labels"]
    batch = cwp.one_batch(images, labels)
    learner.test_loader = batch
    out: Record = {"meta": common.pilot_meta(pilot_src)}

    def step(mode: str) -> Record:
        losses: list = []
        steps: list = []
        with cwp.captured_backward(losses), recorded_steps(steps, names):
            learner._train(batch, batch, mode=mode)
        return step_record(losses, steps)

    out["step zeros"] = step("train")
    with torch.no_grad():
        net.fc.weight.copy_(inputs["fc_weight"])
        net.fc.sigma.copy_(inputs["fc_sigma"])
    out["step given"] = step("train")
    out["retrain step"] = step("retrain")

    one = cwp.one_batch(images[:1], labels[:1])
    learner.args.update(epochs=10, epc_re=5)
    learner.epochs = 10
    for mode in ("train", "retrain"):
        steps: list = []
        with recorded_steps(steps, names):
            learner._train(one, one, mode=mode)
        out[f"lrs {mode}"] = [s["lrs"] for s in steps]

    vectors, targets = learner._extract_vectors(batch)  # the official _compute_class_mean on these images
    out["ptm means"] = torch.stack([torch.as_tensor(vectors[targets == c].mean(0)) for c in range(KNOWN, TOTAL)])

    vit, d_prev, d_1 = inputs["vit"], inputs["delta_prev"], inputs["delta_1"]
    learner.model_merged_vector = state_dict_to_vector({f"backbone.{k}": v for k, v in d_prev.items()}).cpu()
    net.backbone.load_state_dict({k: vit[k] + d_1[k] for k in vit})
    learner._class_means = inputs["ptm_means"].numpy()
    scalars: list = []
    with cwp.spy(learner, "_calculate_adjust_ratio", scalars, fn=float):
        learner._stage1_merge_backbone(ClassData(images, labels))
    out["merge"] = {
        "s": torch.tensor(scalars[0]),
        "vit": {k: cwp.detached(v) for k, v in net.backbone.state_dict().items()},
    }

    for scale, means in inputs["means"].items():
        plans: list = []
        learner._class_means = np.array(means.numpy())
        with torch.no_grad():
            net.fc.weight.copy_(inputs["fc_weight"])
        with recorded_plans(ot, plans):
            learner._stage2_transport_classifier()
        out[f"transport {scale}"] = {"plan": plans[0], "fc_weight": cwp.detached(net.fc.weight)}
    return out


# ----------------------------------------------------------------------------------- our side
def run_ours(inputs: Record) -> Record:
    from pilot.data.scenario import make_scenario
    from pilot.learners import duct as duct_module
    from pilot.modules.merging import flatten, floating_state, unflatten_
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    from pilot.api import make_learner

    learner = make_learner(
        "duct", cwp.our_backbone(inputs["vit"]), scenario, runtime, epochs=1, retrain_epochs=1, new_row_init="zeros"
    )
    learner.begin_session(scenario.sessions[0])
    learner.begin_session(scenario.sessions[1])
    learner.train()
    info = scenario.sessions[1]
    names = {id(p): f"backbone.{n}" for n, p in learner.backbone.model.named_parameters()}
    names[id(learner.head.weight)], names[id(learner.head.sigma)] = "fc.weight", "fc.sigma"
    images, labels = inputs["images"], inputs["labels"]
    session = OneBatchSession(info, [cwp.our_batch(images, labels, "train")])
    out: Record = {"meta": common.our_meta()}

    def step(run: Any) -> Record:
        losses: list = []
        steps: list = []
        runtime.on_epoch = lambda epoch, loss, lr: losses.append(loss)
        with recorded_steps(steps, names):
            run(session)
        runtime.on_epoch = None
        return step_record(losses, steps)

    out["step zeros"] = step(learner.train_session)
    out["ptm means"] = learner.means[KNOWN:TOTAL].float().clone()
    with torch.no_grad():
        learner.head.weight.copy_(inputs["fc_weight"])
        learner.head.sigma.copy_(inputs["fc_sigma"])
    out["step given"] = step(learner.train_session)
    out["retrain step"] = step(learner.retrain_classifier)

    one = OneBatchSession(info, [cwp.our_batch(images[:1], labels[:1], "train")])
    learner.epochs, learner.retrain_epochs = 10, 5
    for mode, run in (("train", learner.train_session), ("retrain", learner.retrain_classifier)):
        steps: list = []
        with recorded_steps(steps, names):
            run(one)
        out[f"lrs {mode}"] = [s["lrs"] for s in steps]

    vit, d_prev, d_1 = inputs["vit"], inputs["delta_prev"], inputs["delta_1"]
    order = [n for n, _ in learner.backbone.model.named_parameters()]
    state = floating_state(learner.backbone)
    assert len(state) == len(order), "the ViT has no floating-point buffers"
    learner.merged = flatten(vit[n] + d_prev[n] for n in order)
    unflatten_(flatten(vit[n] + d_1[n] for n in order), state)
    learner.means[:TOTAL] = inputs["ptm_means"]
    scalars: list = []
    with cwp.spy(learner, "similarity", scalars, fn=float):
        learner.merge_backbone(session)
    merged = {n: cwp.detached(p) for n, p in learner.backbone.model.named_parameters()}
    out["merge"] = {"s": torch.tensor(scalars[0]), "vit": merged}

    for scale, means in inputs["means"].items():
        plans: list = []
        original = duct_module.transport_classifier

        def recording(*args: Any, **kwargs: Any) -> Any:
            updated, plan = original(*args, **kwargs)
            plans.append(plan)
            return updated, plan

        duct_module.transport_classifier = recording
        learner.means[:TOTAL] = means
        with torch.no_grad():
            learner.head.weight.copy_(inputs["fc_weight"])
        try:
            learner.consolidate_classifier(info)
        finally:
            duct_module.transport_classifier = original
        out[f"transport {scale}"] = {"plan": plans[0], "fc_weight": cwp.detached(learner.head.weight)}
    return out


# ------------------------------------------------------------------------------------- compare
def report(ours: Record, ref: Record) -> str:
    rows = []
    for name in ("step zeros", "step given", "retrain step"):
        o, r = ours[name], ref[name]
        rows.append(diff_row(f"{name}: loss", o["loss"].double(), r["loss"].double()))
        if r["vit"]:
            rows += vit_rows(f"{name}: gradient", o["vit"], r["vit"])
        rows.append(diff_row(f"{name}: gradient of new rows", o["fc_weight"][KNOWN:], r["fc_weight"][KNOWN:]))
        rows.append(diff_row(f"{name}: gradient of old rows", o["fc_weight"][:KNOWN], r["fc_weight"][:KNOWN]))
        rows.append(diff_row(f"{name}: gradient of sigma", o["fc_sigma"], r["fc_sigma"]))
    rows.append(diff_row("theta_0 class means", ours["ptm means"], ref["ptm means"].float()))
    rows.append(diff_row("merge: s_1 (mean cosine)", ours["merge"]["s"].double(), ref["merge"]["s"].double()))
    rows += vit_rows("merged backbone", ours["merge"]["vit"], ref["merge"]["vit"])
    for scale in SCALES:
        o, r = ours[f"transport {scale}"], ref[f"transport {scale}"]
        rows.append(diff_row(f"transport (mean spread {scale}): plan", o["plan"], r["plan"]))
        rows.append(
            diff_row(f"transport (mean spread {scale}): old rows", o["fc_weight"][:KNOWN], r["fc_weight"][:KNOWN])
        )
        rows.append(
            diff_row(f"transport (mean spread {scale}): new rows", o["fc_weight"][KNOWN:], r["fc_weight"][KNOWN:])
        )
    same_lrs = {m: ours[f"lrs {m}"] == ref[f"lrs {m}"] for m in ("train", "retrain")}
    largest = ", ".join(f"{s}: {float(ref['transport ' + str(s)]['plan'].max()):.3g}" for s in SCALES)
    notes = [
        f"{common.headline(ours, ref)}; CPU float32.",
        f"step lrs (backbone, classifier): PILOT {ref['step given']['lrs']}, ours {ours['step given']['lrs']}; "
        f"retraining: PILOT {ref['retrain step']['lrs']}, ours {ours['retrain step']['lrs']}.",
        f"lr per epoch equal: training {same_lrs['train']} (PILOT classifier {[g[1] for g in ref['lrs train']]}), "
        f"retraining {same_lrs['retrain']} (PILOT {[g[0] for g in ref['lrs retrain']]}).",
        f"largest plan entry per mean spread: {largest} (1/n = 0.1: a one-to-one matching).",
    ]
    return common.diff_report(notes, rows)


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report)
