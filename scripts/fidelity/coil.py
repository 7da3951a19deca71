"""Side-by-side check of our COIL learner against LAMDA-PILOT's ``models/coil.py``.

Protocol as ``scripts/fidelity/cofima.py`` (whose helpers this script imports): CPU, float32, the same
seeded random ViT-B/16 weights on both sides (PILOT's ``timm.create_model`` redirected to them, nothing
downloaded), optimiser steps recorded and not applied. Setting: ``exps/coil.json`` (CIFAR B0Inc10) at the
boundary of sessions 0 and 1. PILOT's POT (``ot``) must be installed in its environment.

Data: a pool of 2 images per class for classes 0-19 (ids 0-39, class-sorted). Classes 0-9 keep both
images as exemplars; PILOT's "all training images" of an old class are those same two, so the old class
means are the same whether taken from the memory or from all the data (ours runs with
``prospective_old_means=all_data``, PILOT's source). The training batch: 8 images of the pool (old and new
classes). theta_prev (the network at the end of session 0: random ViT + a given 10-row cosine head and
sigma) is the previous model; training runs on theta_cur = theta_prev + 1e-3 noise.

Compared, each side running its own code:

* **prospective transport** (PILOT ``after_task`` -> ``solving_ot`` with theta_prev; ours
  ``COIL.prospective_transport`` at the start of ``train_session``): the 20 class means, the plan
  ``[10, 10]``, the new rows ``W_new`` and gamma;
* **training step, epoch 0** (PILOT ``_train`` with ``epochs=2`` on a one-batch loader; ours
  ``train_session`` with ``epochs=2``): the loss (KD + CE + 0.001 x prospective term), the gradients of
  the backbone, the cosine rows and sigma, the lr;
* **retrospective transport** (epoch 1, batch 0: PILOT ``solving_ot_to_old``; ours
  ``COIL.retrospective_transport``) with theta_cur: class means, plan, the directions of ``W_old'``;
* **training step, epoch 1** (loss with the retrospective term x 1e-3 x (1/2)^2) and its gradients;
* **logits** of the batch after training (PILOT ``_network(x)["logits"]``; ours ``predict``).

Commands::

    .venv/bin/python scripts/fidelity/coil.py make-inputs --out /tmp/coil_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/coil.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/coil_fid --out /tmp/coil_fid/pilot.pt
    .venv/bin/python scripts/fidelity/coil.py ours --inputs /tmp/coil_fid --out /tmp/coil_fid/ours.pt
    .venv/bin/python scripts/fidelity/coil.py compare /tmp/coil_fid/pilot.pt /tmp/coil_fid/ours.pt
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import common
import torch
import torch.nn.functional as F
from cofima import pilot_args, shared_timm_weights, vit_rows
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row

PER_CLASS = 2
BATCH_IDS = [0, 3, 8, 15, 21, 26, 33, 38]  # the training batch: pool ids of old and new classes


# ---------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int) -> None:
    vit, gen = common.seeded_vit(seed)
    inputs = {
        "meta": common.input_meta(seed),
        "vit": vit,
        "vit_cur": {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "pool": cwp.random_images(TOTAL * PER_CLASS, gen),
        "pool_labels": torch.arange(TOTAL).repeat_interleave(PER_CLASS),
        "fc_weight": (torch.rand(KNOWN, DIM, generator=gen) * 2 - 1) / DIM**0.5,
        "fc_sigma": torch.tensor([1.3]),
    }
    common.save_inputs(inputs, out)


@contextlib.contextmanager
def all_steps(store: list, names: dict[int, str]) -> Iterator[None]:
    """``SGD.step`` records the groups' lrs and the named gradients of every step, and changes nothing."""
    original = torch.optim.SGD.step

    def step(self: torch.optim.SGD, closure: Callable | None = None) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = {names[id(p)]: cwp.detached(p.grad) for p in params}
        store.append({"lrs": [g["lr"] for g in self.param_groups], "grads": grads})

    torch.optim.SGD.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]


def step_record(loss: torch.Tensor, step: Record) -> Record:
    grads = step["grads"]
    return {
        "loss": torch.as_tensor(loss).reshape(()).double(),
        "vit": {k[len("backbone.") :]: v for k, v in grads.items() if k.startswith("backbone.")},
        "fc_weight": grads["fc.weight"],
        "fc_sigma": grads["fc.sigma"],
        "lrs": step["lrs"],
    }


def as_double(out: Any) -> torch.Tensor:
    return cwp.detached(torch.as_tensor(out)).double()


# ---------------------------------------------------------------------------------- PILOT side
class PoolData:
    """PILOT's ``data_manager`` over the pool: ``get_dataset`` by classes or by ``appendent`` (ids)."""

    nb_classes = NUM_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def get_task_size(self, task: int) -> int:
        return INCREMENT

    def get_dataset(self, classes: Any, source: str, mode: str, appendent: Any = None, ret_data: bool = False) -> Any:
        import numpy as np

        if appendent is not None:
            ids = np.asarray(appendent[0], dtype=np.int64)
        else:
            ids = np.flatnonzero(np.isin(self.labels.numpy(), np.asarray(classes)))
        dataset = [(int(i), self.images[i], self.labels[i]) for i in ids]
        return (ids, self.labels[ids].numpy(), dataset) if ret_data else dataset


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    import numpy as np
    import ot
    from models.coil import Learner

    with shared_timm_weights(inputs["vit"]):
        learner = Learner(pilot_args(pilot_src, "coil", epochs=2))
    net = learner._network
    net.update_fc(KNOWN)
    with torch.no_grad():
        net.fc.weight.copy_(inputs["fc_weight"])
        net.fc.sigma.copy_(inputs["fc_sigma"])
    pool, pool_labels = inputs["pool"], inputs["pool_labels"]
    learner.data_manager = PoolData(pool, pool_labels)
    memory = np.arange(KNOWN * PER_CLASS)
    learner._data_memory, learner._targets_memory = memory, pool_labels[memory].numpy()
    learner._cur_task, learner._total_classes = 0, KNOWN
    out: Record = {"meta": common.pilot_meta(pilot_src)}

    plans: list = []
    with cwp.spy(ot, "sinkhorn", plans, as_double):
        learner.after_task()  # solving_ot with theta_prev, then the frozen copy
    out["prospective"] = {
        "means": torch.as_tensor(learner._ot_prototype_means[:TOTAL]),
        "plan": plans[0],
        "rows": cwp.detached(learner.nextperiod_initialization),
        "gamma": torch.as_tensor(float(learner.calibration_term)).double(),
    }
    # incremental_train of session 1, without its loaders and memory update
    learner._cur_task, learner._total_classes = 1, TOTAL
    net.update_fc(TOTAL, learner.nextperiod_initialization)
    learner.lamda = KNOWN / TOTAL
    net.backbone.load_state_dict(inputs["vit_cur"])
    names = {id(p): n for n, p in net.named_parameters()}
    batch = cwp.one_batch(pool[BATCH_IDS], pool_labels[BATCH_IDS])
    losses: list = []
    steps: list = []
    retro: list = []

    def solving_ot_to_old() -> torch.Tensor:
        branch = type(learner).solving_ot_to_old(learner)
        retro.append({"means": torch.as_tensor(learner._ot_prototype_means[:TOTAL]), "rows": cwp.detached(branch)})
        return branch

    learner.solving_ot_to_old = solving_ot_to_old
    soft: list = []
    log_soft: list = []
    with cwp.captured_backward(losses), all_steps(steps, names), cwp.spy(ot, "sinkhorn", plans, as_double):
        with cwp.spy(F, "softmax", soft, as_double), cwp.spy(F, "log_softmax", log_soft, as_double):
            learner._train(batch, batch)
    out["step 0"], out["step 1"] = step_record(losses[0], steps[0]), step_record(losses[1], steps[1])

    # the loop's softmaxes, in call order: epoch 0 [old model, W_new target], epoch 1 [old model];
    # log-softmaxes: epoch 0 [current old classes, current new classes], epoch 1 [current old classes, W_old']
    def cross(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return -(p * log_q).sum(1).mean()

    out["step 0"]["terms"] = {"kd": cross(soft[0], log_soft[0]), "transport": cross(soft[1], log_soft[1])}
    out["step 1"]["terms"] = {"kd": cross(soft[2], log_soft[2]), "transport": cross(soft[2], log_soft[3])}
    out["retrospective"] = {**retro[0], "plan": plans[1]}
    with torch.no_grad():
        out["logits"] = cwp.detached(net(pool[BATCH_IDS])["logits"])
    return out


# ----------------------------------------------------------------------------------- our side
class PoolSession:
    """What COIL reads of a session, served from the pool (batches of our ``Batch``)."""

    def __init__(self, info: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.info, self.images, self.labels = info, images, labels
        self.pipeline = self

    def _batch(self, ids: Any) -> list:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return [cwp.our_batch(self.images[ids], self.labels[ids], "train")]

    def batches(self, split: str, classes: range, batch_size: int, **kwargs: Any) -> list:
        return self._batch(torch.nonzero((self.labels >= classes.start) & (self.labels < classes.stop)).flatten())

    def sample_batches(self, ids: Any, batch_size: int) -> list:
        return self._batch(ids)

    def prototype_batches(self, batch_size: int) -> list:
        return self.batches("train", self.info.new_classes, batch_size)

    def replay_batches(self, batch_size: int, memory_ids: Any) -> list:
        return self._batch(BATCH_IDS)


def run_ours(inputs: Record) -> Record:
    from pilot.api import make_learner
    from pilot.data.scenario import make_scenario
    from pilot.learners import coil as coil_module
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    learner = make_learner(
        "coil", cwp.our_backbone(inputs["vit"]), scenario, runtime, epochs=2, prospective_old_means="all_data"
    )
    learner.begin_session(scenario.sessions[0])
    with torch.no_grad():
        learner.head.weight.copy_(inputs["fc_weight"])
        learner.head.sigma.copy_(inputs["fc_sigma"])
    pool, pool_labels = inputs["pool"], inputs["pool_labels"]
    memory = torch.arange(KNOWN * PER_CLASS)
    learner.memory.ids_buffer, learner.memory.labels = memory, pool_labels[memory]
    learner.begin_session(scenario.sessions[1])
    learner.train()
    session = PoolSession(scenario.sessions[1], pool, pool_labels)
    out: Record = {"meta": common.our_meta()}

    means: list = []
    plans: list = []
    prospective = learner.prospective_transport
    retrospective = learner.retrospective_transport

    def class_means(*args: Any, **kwargs: Any) -> torch.Tensor:
        result = type(learner).class_means(learner, *args, **kwargs)
        means.append(result.detach().clone())
        return result

    def start(session: Any) -> torch.Tensor:  # prospective transport with theta_prev, then train theta_cur
        rows = prospective(session)
        old, new = means[-2:]
        out["prospective"] = {
            "means": torch.cat([old, new]),
            "plan": plans[-1],
            "rows": cwp.detached(rows),
            "gamma": torch.tensor(0.0, dtype=torch.float64),  # filled below
        }
        old_rows = learner.head.weight[:KNOWN].double()
        moved = plans[-1].T @ F.normalize(old_rows, dim=1) * KNOWN
        out["prospective"]["gamma"] = old_rows.norm(dim=1).mean() / moved.norm(dim=1).mean()
        learner.backbone.model.load_state_dict(inputs["vit_cur"])
        return rows

    def retro(session: Any) -> torch.Tensor:
        rows = retrospective(session)
        new, old = means[-2:]
        out["retrospective"] = {"means": torch.cat([old, new]), "plan": plans[-1], "rows": cwp.detached(rows)}
        return rows

    learner.class_means, learner.prospective_transport, learner.retrospective_transport = class_means, start, retro
    names = {id(p): f"backbone.{n}" for n, p in learner.backbone.model.named_parameters()}
    names[id(learner.head.weight)], names[id(learner.head.sigma)] = "fc.weight", "fc.sigma"
    losses: list = []
    steps: list = []
    terms: list = []
    runtime.on_epoch = lambda epoch, loss, lr: losses.append(torch.tensor(loss))
    with all_steps(steps, names), cwp.spy(coil_module, "sinkhorn", plans, as_double):
        with cwp.spy(learner, "loss_terms", terms, fn=lambda t: {k: cwp.detached(v).double() for k, v in t.items()}):
            learner.train_session(session)
    runtime.on_epoch = None
    out["step 0"], out["step 1"] = step_record(losses[0], steps[0]), step_record(losses[1], steps[1])
    out["step 0"]["terms"], out["step 1"]["terms"] = terms
    learner.eval()
    out["logits"] = cwp.detached(learner.predict(cwp.our_batch(pool[BATCH_IDS], pool_labels[BATCH_IDS], "test")))
    return out


# ------------------------------------------------------------------------------------- compare
def report(ours: Record, ref: Record) -> str:
    rows = []
    for name in ("prospective", "retrospective"):
        o, r = ours[name], ref[name]
        rows.append(diff_row(f"{name}: class means (old 0-9, new 10-19)", o["means"], r["means"]))
        rows.append(diff_row(f"{name}: plan", o["plan"], r["plan"]))
        if name == "prospective":
            rows.append(diff_row("prospective: new rows W_new", o["rows"], r["rows"]))
            rows.append(diff_row("prospective: gamma", o["gamma"].reshape(()), r["gamma"].reshape(())))
        else:  # PILOT's rows carry K x calibration; only their directions are used
            rows.append(
                diff_row(
                    "retrospective: directions of W_old'",
                    F.normalize(o["rows"].double(), dim=1),
                    F.normalize(r["rows"].double(), dim=1),
                )
            )
    for name in ("step 0", "step 1"):
        o, r = ours[name], ref[name]
        rows.append(diff_row(f"{name}: loss", o["loss"], r["loss"]))
        for term, label in (("kd", "KD term"), ("transport", "transport term (unweighted)")):
            rows.append(diff_row(f"{name}: {label}", o["terms"][term].reshape(()), r["terms"][term].reshape(())))
        rows += vit_rows(f"{name}: gradient", o["vit"], r["vit"])
        rows.append(diff_row(f"{name}: gradient of the old rows", o["fc_weight"][:KNOWN], r["fc_weight"][:KNOWN]))
        rows.append(diff_row(f"{name}: gradient of the new rows", o["fc_weight"][KNOWN:], r["fc_weight"][KNOWN:]))
        rows.append(diff_row(f"{name}: gradient of sigma", o["fc_sigma"], r["fc_sigma"]))
    rows.append(diff_row("logits after training", ours["logits"], ref["logits"]))
    plan = ref["prospective"]["plan"]
    notes = [
        f"{common.headline(ours, ref)}; CPU float32, random ViT-B/16.",
        f"lrs: PILOT {ref['step 0']['lrs']} / {ref['step 1']['lrs']}, ours {ours['step 0']['lrs']} / "
        f"{ours['step 1']['lrs']}.",
        f"prospective plan: row sums {float(plan.sum(1).min()):.4f}-{float(plan.sum(1).max()):.4f}, column sums "
        f"{float(plan.sum(0).min()):.4f}-{float(plan.sum(0).max()):.4f}, largest entry {float(plan.max()):.4f}.",
    ]
    return common.diff_report(notes, rows)


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report)
