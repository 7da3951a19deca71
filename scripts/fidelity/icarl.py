"""Side-by-side check of our exemplar memory, iCaRL and Finetune against LAMDA-PILOT's code
(``models/base.py`` memory and NME, ``models/icarl.py``, ``models/finetune.py``, ``utils/inc_net.py``).

Protocol (as ``scripts/compare_with_pilot.py``, whose helpers this script imports): CPU, float32; PILOT's
code runs in its own environment (timm 0.6.13), ours in the project's venv. Nothing is downloaded:
PILOT's ``timm.create_model(..., pretrained=True)`` is redirected to ``pretrained=False`` and the shared
weights are loaded into its backbone.

* **Memory and NME** (no ViT needed): 4 classes x 30 samples of given 32-d "images"; the network is a
  fixed linear map (a different one after session 1, as a trained network would be). PILOT's own
  ``build_rehearsal_memory`` (``_reduce_exemplar`` + ``_construct_exemplar``, or
  ``_construct_exemplar_unified`` with ``fixed_memory``) runs on a data manager serving these samples,
  for session 0 (classes 0-1) and session 1 (classes 2-3); ours is ``ExemplarMemory.update``.
  Compared: the exemplar ids of every class in selection order, the class means, and PILOT's
  ``_eval_nme`` top-5 on 40 query samples against ours (``nme_logits`` top-5), plus our NME scores
  against ``-cdist(query, means)^2``. Settings: ``memory_size=24`` (12, then 6 per class) and
  ``fixed_memory`` with ``memory_per_class=5``, herding.
* **iCaRL** on the same seeded random ViT-B/16 (timm key names) and 6 images at 224 px, ``exps/icarl.json``
  (CIFAR B0Inc10), one batch per session, the optimiser's ``step`` a no-op that records the gradients
  (parameters stay as loaded). Session 0: the given head ``fc0`` [10, 768]; CE; loss, logits,
  gradients of every tensor, SGD settings, trainable count. Session 1: the network at the end of
  session 0 becomes the previous network (PILOT ``after_task``'s frozen copy; ours the copy made when
  session 1's training starts), then the current network gets "trained" weights (ViT + noise) and the
  given head ``fc1`` [20, 768] (old rows differ from ``fc0``), and one step: loss, CE, KD = loss - CE,
  logits, gradients. Growth: the fresh rows of ``update_fc(20)`` against U(+-sqrt(3/768)), bias 0.
  Then the logits after session 1.
* **Finetune** session 1 step on the same weights and images, labelled with new classes only (its
  stream has no old-class images): CE on the new classes' logits, gradients.

Commands::

    .venv/bin/python scripts/fidelity/icarl.py make-inputs --out /tmp/icarl_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/icarl.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/icarl_fid --out /tmp/icarl_fid/pilot.pt
    .venv/bin/python scripts/fidelity/icarl.py ours --inputs /tmp/icarl_fid --out /tmp/icarl_fid/ours.pt
    .venv/bin/python scripts/fidelity/icarl.py compare /tmp/icarl_fid/pilot.pt /tmp/icarl_fid/ours.pt
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from common import DIM, INCREMENT, KNOWN, NUM_CLASSES, TOTAL, Record, cwp, diff_row
from der import OneBatchSession, load_head, names_of, recorded_cross_entropy, recorded_steps

MEM_CLASSES, MEM_PER_CLASS, MEM_DIM, QUERIES = 4, 30, 32, 40
MEMORY_SETTINGS = {"total": dict(memory_size=24, memory_per_class=0, fixed_memory=False),
                   "fixed": dict(memory_size=0, memory_per_class=5, fixed_memory=True)}  # fmt: skip


# --------------------------------------------------------------------------------------- inputs
def make_inputs(out: Path, seed: int, batch: int) -> None:
    vit, gen = common.seeded_vit(seed)
    bound = math.sqrt(3 / DIM)
    fc0 = (torch.rand(KNOWN, DIM, generator=gen) * 2 - 1) * bound
    labels = torch.arange(MEM_CLASSES).repeat_interleave(MEM_PER_CLASS)
    shuffle = torch.randperm(len(labels), generator=gen)  # classes interleaved in the sample ids
    centres = 2 * torch.randn(MEM_CLASSES, MEM_DIM, generator=gen)
    inputs = {
        "meta": common.input_meta(seed, batch=batch),
        "vit": vit,
        "vit_trained": {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in vit.items()},
        "images": cwp.random_images(batch, gen),
        "labels0": torch.randint(0, KNOWN, (batch,), generator=gen),
        "labels1": torch.cat(
            [
                torch.randint(0, KNOWN, (batch // 2,), generator=gen),
                torch.randint(KNOWN, TOTAL, (batch - batch // 2,), generator=gen),
            ]
        ),  # fmt: skip
        "fc0_w": fc0,
        "fc0_b": 0.01 * torch.randn(KNOWN, generator=gen),
        "fc1_w": torch.cat(
            [
                fc0 + 0.02 * torch.randn(KNOWN, DIM, generator=gen),
                (torch.rand(TOTAL - KNOWN, DIM, generator=gen) * 2 - 1) * bound,
            ]
        ),  # fmt: skip
        "fc1_b": 0.01 * torch.randn(TOTAL, generator=gen),
        # memory: samples (rows = sample ids), labels, the two sessions' networks (linear maps), queries
        "mem_data": (torch.randn(len(labels), MEM_DIM, generator=gen) + centres[labels])[shuffle],
        "mem_labels": labels[shuffle],
        "mem_maps": [torch.eye(MEM_DIM), torch.eye(MEM_DIM) + 0.3 * torch.randn(MEM_DIM, MEM_DIM, generator=gen)],
        "mem_queries": torch.randn(QUERIES, MEM_DIM, generator=gen) + centres[torch.arange(QUERIES) % MEM_CLASSES],
    }
    common.save_inputs(inputs, out)


# --------------------------------------------------------------------------------------- shared
def fresh_rows(weight: torch.Tensor, bias: torch.Tensor, fc0: torch.Tensor) -> Record:
    """The head after ``update_fc(20)``: old rows kept, fresh rows' range against sqrt(3/768), bias 0."""
    return {
        "old rows == fc0": bool(torch.equal(weight[:KNOWN], fc0)),
        "fresh max abs / sqrt(3/768)": round(float(weight[KNOWN:].abs().max()) / math.sqrt(3 / DIM), 4),
        "fresh bias max abs": float(bias[KNOWN:].abs().max()),
    }


def new_class_labels(inputs: Record) -> torch.Tensor:
    """Session 1's labels moved into its new classes (Finetune trains on new classes only)."""
    return inputs["labels1"] % INCREMENT + KNOWN


def step_record(losses: list, ces: list, steps: list, trainable: int) -> Record:
    return {"loss": losses[0], "ce": ces[0], "grads": steps[0]["grads"], "settings": steps[0]["settings"],
            "trainable": trainable}  # fmt: skip


# ---------------------------------------------------------------------------------- PILOT side
class FeatureSamples(torch.utils.data.Dataset):
    """PILOT's ``(index, input, target)`` samples whose inputs are rows of a feature table."""

    def __init__(self, ids: np.ndarray, targets: np.ndarray, table: torch.Tensor) -> None:
        self.ids, self.targets, self.table = np.asarray(ids), np.asarray(targets), table

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return i, self.table[int(self.ids[i])], int(self.targets[i])


class FeatureDataManager:
    """What PILOT's memory code asks of its ``DataManager``: a class's samples (``data`` = sample ids), or
    the ``appendent`` (ids, targets) it passes back."""

    def __init__(self, table: torch.Tensor, labels: torch.Tensor) -> None:
        self.table, self.labels = table, labels.numpy()

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False):  # noqa: ANN001, ANN201
        if appendent is not None and len(appendent[0]):
            data, targets = np.asarray(appendent[0]), np.asarray(appendent[1])
        else:
            data = np.flatnonzero(np.isin(self.labels, np.asarray(indices)))
            targets = self.labels[data]
        dataset = FeatureSamples(data, targets, self.table)
        return (data, targets, dataset) if ret_data else dataset


class LinearNetwork(torch.nn.Module):
    """A stand-in network whose ``extract_vector`` is a fixed linear map."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix, self.feature_dim = matrix, matrix.shape[1]

    def extract_vector(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def pilot_memory(inputs: Record) -> Record:
    from models.base import BaseLearner

    out = {}
    manager = FeatureDataManager(inputs["mem_data"], inputs["mem_labels"])
    queries = FeatureSamples(np.arange(QUERIES), np.zeros(QUERIES, dtype=np.int64), inputs["mem_queries"])
    for name, setting in MEMORY_SETTINGS.items():
        learner = BaseLearner({**setting, "device": ["cpu"]})
        sessions = []
        for index, (known, total) in enumerate(((0, 2), (2, 4))):
            learner._network = LinearNetwork(inputs["mem_maps"][index])
            learner._known_classes, learner._total_classes = known, total
            learner.build_rehearsal_memory(manager, learner.samples_per_class)
            sessions.append({"ids": torch.as_tensor(learner._data_memory.astype(np.int64)),
                             "labels": torch.as_tensor(learner._targets_memory.astype(np.int64)),
                             "means": torch.as_tensor(learner._class_means).float()})  # fmt: skip
        loader = torch.utils.data.DataLoader(queries, batch_size=16, shuffle=False)
        top5, _ = learner._eval_nme(loader, learner._class_means)
        out[name] = {"sessions": sessions, "nme_top5": torch.as_tensor(top5)}
    return out


PILOT_RULES = [(r"^backbone\.", "vit."), (r"^fc\.", "fc.")]


def pilot_step(learner: Any, net: torch.nn.Module, inputs: Record, labels: torch.Tensor) -> Record:
    losses: list = []
    ces: list = []
    steps: list = []
    loader = cwp.one_batch(inputs["images"], labels)
    with cwp.captured_backward(losses), recorded_cross_entropy(ces), recorded_steps(steps, names_of(net, PILOT_RULES)):
        learner._train(loader, [])
    return step_record(losses, ces, steps, sum(p.numel() for p in net.parameters() if p.requires_grad))


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    import timm

    create = timm.create_model
    timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)
    from models.finetune import Learner as PilotFinetune
    from models.icarl import Learner as PilotICaRL

    def args(name: str) -> Record:
        values = json.loads((pilot_src / "exps" / f"{name}.json").read_text())
        return {**values, "device": ["cpu"], "init_epoch": 1, "epochs": 1}

    result: Record = {"memory": pilot_memory(inputs)}
    learner = PilotICaRL(args("icarl"))
    learner._compute_accuracy = lambda *a: 0.0  # its per-epoch test pass: no loader here
    net = learner._network
    net.backbone.load_state_dict(inputs["vit"])
    learner._cur_task, learner._total_classes = 0, KNOWN
    net.update_fc(KNOWN)
    load_head(net.fc, inputs["fc0_w"], inputs["fc0_b"])
    result["s0"] = pilot_step(learner, net, inputs, inputs["labels0"])
    learner.after_task()  # the previous network: a frozen copy of (ViT, fc0)
    learner._cur_task, learner._total_classes = 1, TOTAL
    net.update_fc(TOTAL)
    result["growth"] = fresh_rows(net.fc.weight.detach(), net.fc.bias.detach(), inputs["fc0_w"])
    net.backbone.load_state_dict(inputs["vit_trained"])
    load_head(net.fc, inputs["fc1_w"], inputs["fc1_b"])
    result["s1"] = pilot_step(learner, net, inputs, inputs["labels1"])
    net.eval()
    with torch.no_grad():
        result["logits1"] = cwp.detached(net(inputs["images"])["logits"])

    fine = PilotFinetune(args("finetune"))
    fine._compute_accuracy = lambda *a: 0.0
    fnet = fine._network
    fnet.update_fc(KNOWN)
    fine.after_task()
    fine._known_classes, fine._cur_task, fine._total_classes = KNOWN, 1, TOTAL
    fnet.update_fc(TOTAL)
    fnet.backbone.load_state_dict(inputs["vit_trained"])
    load_head(fnet.fc, inputs["fc1_w"], inputs["fc1_b"])
    result["finetune"] = pilot_step(fine, fnet, inputs, new_class_labels(inputs))
    result["meta"] = common.pilot_meta(pilot_src)
    return result


# ------------------------------------------------------------------------------------ our side
class FeatureBatch:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.global_size = images, labels, len(labels)

    def __len__(self) -> int:
        return len(self.labels)


class FeatureSession:
    """What ``ExemplarMemory.update`` reads of a session, over the feature table."""

    def __init__(self, inputs: Record, known: int, total: int, index: int) -> None:
        from types import SimpleNamespace

        from pilot.data.scenario import SessionInfo

        self.data, self.labels = inputs["mem_data"], inputs["mem_labels"]
        self.info = SessionInfo(index=index, known=known, total=total)
        labels = self.labels.numpy()
        self.pipeline = SimpleNamespace(
            indices=lambda split, classes: np.flatnonzero((labels >= classes.start) & (labels < classes.stop))
        )

    def sample_batches(self, ids: np.ndarray, batch_size: int) -> list[FeatureBatch]:
        ids_t = torch.as_tensor(np.asarray(ids))
        return [FeatureBatch(self.data[part], self.labels[part]) for part in ids_t.split(batch_size)]


def our_memory(inputs: Record) -> Record:
    from pilot.modules.exemplar_memory import ExemplarMemory
    from pilot.runtime import Runtime

    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    out = {}
    for name, setting in MEMORY_SETTINGS.items():
        memory = ExemplarMemory(**setting)
        sessions = []
        for index, (known, total) in enumerate(((0, 2), (2, 4))):
            matrix = inputs["mem_maps"][index]
            memory.update(lambda x: x @ matrix, FeatureSession(inputs, known, total, index), runtime, known, total)
            sessions.append({"ids": memory.ids_buffer.clone(), "labels": memory.labels.clone(),
                             "means": memory.class_means.clone()})  # fmt: skip
        feats = inputs["mem_queries"] @ inputs["mem_maps"][1]
        scores = memory.nme_logits(feats)
        phi = feats.double() / (feats.double().norm(dim=1, keepdim=True) + 1e-8)
        direct = -(torch.cdist(phi, memory.class_means.double()) ** 2)
        top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
        out[name] = {"sessions": sessions, "nme_top5": top5, "nme": scores, "direct": direct}
    return out


OUR_RULES = [(r"^backbone\.model\.", "vit."), (r"^head\.", "fc.")]


def our_learner(name: str, vit: dict[str, torch.Tensor]) -> Any:
    from pilot.api import make_learner
    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    return make_learner(name, cwp.our_backbone(vit), scenario, runtime, epochs=1, init_epochs=1)


def our_step(learner: Any, inputs: Record, labels: torch.Tensor, index: int) -> Record:
    losses: list = []
    ces: list = []
    steps: list = []
    batch = cwp.our_batch(inputs["images"], labels, "train")
    session = OneBatchSession(learner.scenario.sessions[index], batch)
    names = names_of(learner, OUR_RULES)
    with cwp.captured_backward(losses), recorded_cross_entropy(ces), recorded_steps(steps, names):
        learner.train_session(session)
    return step_record(losses, ces, steps, sum(p.numel() for p in learner.parameters() if p.requires_grad))


def run_ours(inputs: Record) -> Record:
    result: Record = {"memory": our_memory(inputs)}
    learner = our_learner("icarl", inputs["vit"])
    s = learner.scenario.sessions
    learner.train()
    learner.begin_session(s[0])
    load_head(learner.head, inputs["fc0_w"], inputs["fc0_b"])
    result["s0"] = our_step(learner, inputs, inputs["labels0"], 0)
    learner.begin_session(s[1])
    result["growth"] = fresh_rows(learner.head.weight.detach(), learner.head.bias.detach(), inputs["fc0_w"])
    copy_previous = learner.previous_network

    def previous() -> Any:  # the copy is made from the end-of-session-0 state; then training "changes" it
        network = copy_previous()
        learner.backbone.model.load_state_dict(inputs["vit_trained"])
        load_head(learner.head, inputs["fc1_w"], inputs["fc1_b"])
        return network

    learner.previous_network = previous
    result["s1"] = our_step(learner, inputs, inputs["labels1"], 1)
    learner.eval()
    with torch.no_grad():
        result["logits1"] = cwp.detached(learner.predict(cwp.our_batch(inputs["images"], inputs["labels1"], "test")))

    fine = our_learner("finetune", inputs["vit"])
    fine.train()
    fine.begin_session(s[0])
    fine.begin_session(s[1])
    fine.backbone.model.load_state_dict(inputs["vit_trained"])
    load_head(fine.head, inputs["fc1_w"], inputs["fc1_b"])
    result["finetune"] = our_step(fine, inputs, new_class_labels(inputs), 1)
    result["meta"] = common.our_meta()
    return result


# ------------------------------------------------------------------------------------- compare
def step_rows(label: str, ours: Record, ref: Record, kd: bool) -> list[list[str]]:
    rows = [diff_row(f"{label}: loss", ours["loss"].reshape(()), ref["loss"].reshape(()))]
    rows.append(diff_row(f"{label}: CE", ours["ce"].reshape(()), ref["ce"].reshape(())))
    if kd:
        rows.append(diff_row(f"{label}: KD = loss - CE", (ours["loss"] - ours["ce"]).reshape(()),
                             (ref["loss"] - ref["ce"]).reshape(())))  # fmt: skip
    if set(ours["grads"]) != set(ref["grads"]):
        rows.append(
            [f"{label}: gradient names differ", str(sorted(set(ours["grads"]) ^ set(ref["grads"])))[:200]] + [""] * 3
        )
        return rows
    for group in ("vit", "fc"):
        theirs = {k: v for k, v in ref["grads"].items() if k.startswith(group + ".")}
        rows += common.grouped_rows(label, f"gradient `{group}`", {k: ours["grads"][k] for k in theirs}, theirs)
    return rows


def memory_rows(ours: Record, ref: Record) -> list[list[str]]:
    rows = []
    for name in MEMORY_SETTINGS:
        for index, (a, b) in enumerate(zip(ours[name]["sessions"], ref[name]["sessions"])):
            same = torch.equal(a["ids"], b["ids"]) and torch.equal(a["labels"], b["labels"])
            counts = torch.bincount(b["labels"]).tolist()
            rows.append([f"memory `{name}` s{index}: exemplar ids in selection order",
                         f"per class {counts}", "identical" if same else "DIFFER", "", ""])  # fmt: skip
            rows.append(diff_row(f"memory `{name}` s{index}: class means", a["means"], b["means"]))
        top5 = ours[name]["nme_top5"].equal(ref[name]["nme_top5"])
        shape = "x".join(map(str, ref[name]["nme_top5"].shape))
        label = f"memory `{name}`: NME top-5 (PILOT argsort[:, :5]) on {QUERIES} queries"
        rows.append([label, shape, "identical" if top5 else "DIFFER", "", ""])
        rows.append(diff_row(f"memory `{name}`: our NME scores vs -cdist^2", ours[name]["nme"], ours[name]["direct"]))
    return rows


def report(ours: Record, ref: Record) -> str:
    rows = memory_rows(ours["memory"], ref["memory"])
    rows += step_rows("iCaRL session 0", ours["s0"], ref["s0"], kd=False)
    rows += step_rows("iCaRL session 1", ours["s1"], ref["s1"], kd=True)
    rows.append(diff_row("iCaRL logits after session 1", ours["logits1"], ref["logits1"]))
    rows += step_rows("Finetune session 1", ours["finetune"], ref["finetune"], kd=False)
    notes = [
        f"{common.headline(ours, ref)}; CPU float32, random ViT-B/16, {ours['meta']['inputs']['batch']} images.",
        *(
            f"{k}: SGD PILOT {ref[k]['settings']}, ours {ours[k]['settings']}; "
            f"trainable PILOT {ref[k]['trainable']:,}, ours {ours[k]['trainable']:,}."
            for k in ("s0", "s1", "finetune")
        ),  # fmt: skip
        f"Head growth at session 1: PILOT {ref['growth']}; ours {ours['growth']}.",
    ]
    return common.diff_report(notes, rows, sep="\n\n")


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=6)
