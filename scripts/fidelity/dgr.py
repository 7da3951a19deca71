"""Side-by-side check of our DGR learner (pilot/learners/dgr.py) against LAMDA-PILOT's ``models/dgr.py``.

LAMDA-PILOT's ``models/dgr.py`` is byte-identical to the authors' own ViT implementation (commit
2607652 of github.com/JiangpengHe/imbalanced_cil, "Continual Learning Setup with Pretrained Models").

Protocol (as scripts/compare_with_pilot.py, whose helpers this script imports)
-----------------------------------------------------------------------------
Both sides run on the CPU in float32 on the same seeded *random* ViT weights (timm key names; default
``vit_tiny_patch16_224``, ``--arch vit_base_patch16_224`` for PILOT's backbone), the same head rows
(session 0's rows and session 1's new rows, loaded after each side grows its head), the same batches in
the same order and the same class counts of the training set (PILOT's ``label_distribution``; our
``class_counts``). Setting: 2 sessions x 4 classes, 3 batches of 8 images per session, one epoch per
session, PILOT's optimiser (SGD lr 1e-3, momentum 0.9, weight decay 5e-4, cosine over the epochs).
Session 1's batches mix exemplars of classes 0-3 with new classes 4-7; its counts are those of a
memory of 3 images per old class. PILOT's learner is ``models.dgr.Learner`` from ``exps/dgr.json``,
trained by its own ``_train`` (``_init_train`` / ``_update_representation``: its losses, its
``torch.autograd.grad`` calls, its gradient reweighting) and its ``after_task`` (the old network);
``regularized_cn`` calls ``.cuda()``, made the identity here. Ours: ``begin_session`` and
``train_reweighted`` (what ``train_session`` runs) with ``distillation=kd``.

Recorded per session: the loss of every step (the tensor ``backward`` is called on), the head's
weight and bias gradients at every optimiser step (after the reweighting), every backbone gradient at
the first step, all parameters after the session, and the logits of 8 test images. The first step of
session 1 is where the current and the old network are still the same: see the notes printed by
``compare`` (PILOT divides by the norm of the distillation gradient, which is then 0).

Loss pieces on random logits (no network): ``kd_loss`` vs PILOT ``_KD_loss``,
``logit_adjusted_cross_entropy`` vs ``regularized_cn``, and, with ``--official-src`` (a clone of
JiangpengHe/imbalanced_cil), ``dakd_loss`` vs the authors' ``_DAKD`` on unequal lost counts (values and
gradients).

Commands::

    .venv/bin/python scripts/fidelity/dgr.py make-inputs --out /tmp/dgr_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/dgr.py pilot --pilot-src /work/pilot_ref_src \\
        --official-src /work/.mirror/JiangpengHe+imbalanced_cil/repo --inputs /tmp/dgr_fid --out /tmp/dgr_fid/pilot.pt
    .venv/bin/python scripts/fidelity/dgr.py ours --inputs /tmp/dgr_fid --out /tmp/dgr_fid/ours.pt
    .venv/bin/python scripts/fidelity/dgr.py compare /tmp/dgr_fid/pilot.pt /tmp/dgr_fid/ours.pt \\
        --markdown /tmp/dgr_fid/table.md
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import common
import torch
from common import Record, cwp

PER_SESSION, SESSIONS, STEPS, BATCH, T = 4, 2, 3, 8, 2.0
COUNTS = {0: [30, 24, 18, 12], 1: [3, 3, 3, 3, 30, 24, 18, 12]}  # training images per class, per session
LOST = [27.0, 21.0, 15.0, 9.0]  # DAKD check: lost images per old class (unequal)


# ---------------------------------------------------------------------------------------- make-inputs
def session_labels(session: int, gen: torch.Generator) -> torch.Tensor:
    """Session 0: two images of each of its 4 classes; session 1: two exemplars of old classes and six
    images of new ones per batch, shuffled."""
    if session == 0:
        labels = torch.arange(PER_SESSION).repeat(2)
    else:
        old = torch.randint(0, PER_SESSION, (2,), generator=gen)
        labels = torch.cat([old, PER_SESSION + torch.randint(0, PER_SESSION, (6,), generator=gen)])
    return labels[torch.randperm(len(labels), generator=gen)]


def make_inputs(out: Path, seed: int, arch: str) -> None:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    dim = int(vit.num_features)
    gen = torch.Generator().manual_seed(seed + 1)
    bound = 3**0.5 / dim**0.5  # PILOT's SimpleLinear: kaiming_uniform_(nonlinearity="linear"), bias 0
    batches = {
        s: [(cwp.random_images(BATCH, gen), session_labels(s, gen)) for _ in range(STEPS)] for s in range(SESSIONS)
    }
    inputs = {
        "meta": common.input_meta(seed, arch=arch),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "head_rows": {s: (torch.rand(PER_SESSION, dim, generator=gen) * 2 - 1) * bound for s in range(SESSIONS)},
        "batches": batches,
        "counts": COUNTS,
        "test": (cwp.random_images(BATCH, gen), torch.arange(PER_SESSION * SESSIONS)),
        "pieces": {
            "logits": 3 * torch.randn(6, 2 * PER_SESSION, generator=gen),
            "old_logits": 3 * torch.randn(6, PER_SESSION, generator=gen),
            "labels": torch.randint(0, 2 * PER_SESSION, (6,), generator=gen),
            "counts": torch.tensor(COUNTS[1], dtype=torch.float64),
            "lost": torch.tensor(LOST, dtype=torch.float64),
        },
    }
    common.save_inputs(inputs, out, f" ({arch}, feature dim {dim})")


# ------------------------------------------------------------------------------------- shared helpers
class StepRecorder:
    """Wraps ``torch.optim.SGD.step``: before every step, keeps the loss just backpropagated, the
    head's gradients and (first step of a session) every backbone gradient."""

    def __init__(self) -> None:
        self.head: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.backbone: torch.nn.Module | None = None
        self.steps: list[Record] = []
        self.losses: list[torch.Tensor] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original = torch.optim.SGD.step
        recorder = self

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            recorder.record()
            return original(opt, *args, **kwargs)

        torch.optim.SGD.step = step  # type: ignore[method-assign]
        try:
            with cwp.captured_backward(self.losses):
                yield
        finally:
            torch.optim.SGD.step = original  # type: ignore[method-assign]

    def record(self) -> None:
        assert self.head is not None and self.backbone is not None
        weight, bias = self.head()
        entry: Record = {"head_w": cwp.detached(weight.grad), "head_b": cwp.detached(bias.grad)}
        if not self.steps:
            entry["backbone"] = {n: cwp.detached(p.grad) for n, p in self.backbone.named_parameters()}
        self.steps.append(entry)

    def take(self) -> Record:
        steps, losses = self.steps, list(self.losses)
        self.steps = []
        self.losses.clear()  # the list cwp.captured_backward appends to
        return {
            "loss": torch.stack([loss.reshape(()) for loss in losses]),
            "head_w": torch.stack([s["head_w"] for s in steps]),
            "head_b": torch.stack([s["head_b"] for s in steps]),
            "backbone_grad": steps[0]["backbone"],
        }


def session_record(steps: Record, backbone: torch.nn.Module, weight: Any, bias: Any, logits: Any) -> Record:
    return {
        **steps,
        "backbone_after": {n: cwp.detached(p) for n, p in backbone.named_parameters()},
        "head_w_after": cwp.detached(weight),
        "head_b_after": cwp.detached(bias),
        "test_logits": cwp.detached(logits),
    }


# ----------------------------------------------------------------------------------- LAMDA-PILOT side
@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """``regularized_cn`` moves its prior with ``.cuda()``: on this CPU-only check that is a no-op."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def shared_vit(arch: str, state: dict[str, torch.Tensor]) -> None:
    """PILOT's ``get_backbone`` builds ``vit_base_patch16_224`` with hub weights; build ``arch`` with the
    shared weights instead (nothing is downloaded)."""
    import timm

    original = timm.create_model

    def create(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        model = original(arch, pretrained=False, **kwargs)
        model.load_state_dict(state, strict=True)
        return model

    timm.create_model = create


def official_functions(official_src: Path) -> dict[str, Any]:
    """``_DAKD`` and ``measure_imbalance`` from the authors' ``src/approach/DGR.py`` (read with git, the
    two functions compiled alone: the file's relative imports need the rest of their code base)."""
    source = subprocess.run(
        ["git", "-C", str(official_src), "show", "HEAD:src/approach/DGR.py"], capture_output=True, text=True, check=True
    ).stdout
    tree = ast.parse(source)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_DAKD", "measure_imbalance")]
    import numpy as np

    namespace: dict[str, Any] = {"np": np, "torch": torch}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "DGR.py", "exec"), namespace)
    return namespace


def pilot_pieces(inputs: dict[str, Any], official_src: Path | None) -> Record:
    import models.dgr as dgr

    p = inputs["pieces"]
    known = p["old_logits"].shape[1]
    out: Record = {}
    z = p["logits"].clone().requires_grad_(True)
    loss = dgr._KD_loss(z[:, :known], p["old_logits"], T)
    out["kd"] = (cwp.detached(loss), cwp.detached(torch.autograd.grad(loss, z)[0]))
    z = p["logits"].clone().requires_grad_(True)
    loss = dgr.regularized_cn(z, p["labels"], p["counts"].numpy())
    out["logit_adjusted_ce"] = (cwp.detached(loss), cwp.detached(torch.autograd.grad(loss, z)[0]))
    if official_src is not None:
        official = official_functions(official_src)
        z = p["logits"].clone().requires_grad_(True)
        loss = official["_DAKD"](z[:, :known], p["old_logits"], p["lost"].numpy(), T)
        out["dakd"] = (cwp.detached(loss), cwp.detached(torch.autograd.grad(loss, z)[0]))
        out["rho"] = float(official["measure_imbalance"](p["lost"].numpy()))
    return out


def same_step(module: torch.nn.Module, step: Callable[[], None], recorder: Any) -> Record:
    """The record of ``step`` (without the backbone gradient), then ``module`` back as it was before it."""
    saved = copy.deepcopy(module.state_dict())
    step()
    record = {k: v for k, v in recorder.take().items() if k != "backbone_grad"}
    module.load_state_dict(saved)
    return record


def run_pilot(pilot_src: Path, inputs: dict[str, Any], official_src: Path | None) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    shared_vit(inputs["meta"]["arch"], inputs["vit"])
    from models.dgr import Learner

    args = json.loads((pilot_src / "exps" / "dgr.json").read_text())
    args.update(device=["cpu"], init_epoch=1, epochs=1)
    learner = Learner(args)
    net = learner._network
    net.backbone.out_dim = inputs["vit"]["cls_token"].shape[-1]  # get_backbone writes 768 whatever the model
    recorder = StepRecorder()
    recorder.backbone = net.backbone
    recorder.head = lambda: (learner._network.fc.weight, learner._network.fc.bias)
    x_test, y_test = inputs["test"]
    sessions, initial = {}, None

    def train(s: int, batches: list, old: Any) -> None:
        if old is not None:
            learner._old_network = old
        loader = [(torch.arange(len(y)), x, y) for x, y in batches]
        learner._train(loader, cwp.one_batch(x_test, y_test), inputs["counts"][s])

    with cuda_is_identity(), recorder.active():
        for s in range(SESSIONS):
            learner._cur_task, learner._total_classes = s, (s + 1) * PER_SESSION
            net.update_fc(learner._total_classes)
            with torch.no_grad():
                net.fc.weight[s * PER_SESSION :] = inputs["head_rows"][s]
                net.fc.bias[s * PER_SESSION :] = 0.0
            if s == 0:
                initial = net.copy().freeze()
            else:  # "same": one step with PILOT's own old network (a copy of the current one)
                sessions["s1_same"] = same_step(net, lambda: train(s, inputs["batches"][s][:1], None), recorder)
            train(s, inputs["batches"][s], initial if s else None)  # "distinct": the old network differs
            net.eval()
            with torch.no_grad():
                logits = net(x_test)["logits"]
            sessions[f"s{s}"] = session_record(recorder.take(), net.backbone, net.fc.weight, net.fc.bias, logits)
            learner.after_task()
        pieces = pilot_pieces(inputs, official_src)
    return {
        "meta": common.pilot_meta(pilot_src),
        "sessions": sessions,
        "pieces": pieces,
    }


# ----------------------------------------------------------------------------------------- our side
def our_batch(images: torch.Tensor, labels: torch.Tensor) -> Any:
    from pilot.data.pipeline import Batch

    return Batch(images, lambda x: x, labels, torch.arange(len(labels)), "train", True, len(labels))


def our_pieces(inputs: dict[str, Any]) -> Record:
    from pilot.learners.replay import kd_loss
    from pilot.modules.distillation import dakd_loss, logit_adjusted_cross_entropy, normalized_entropy

    p = inputs["pieces"]
    known = p["old_logits"].shape[1]
    out: Record = {}
    for name, fn in (
        ("kd", lambda z: kd_loss(z[:, :known], p["old_logits"], T)),
        ("logit_adjusted_ce", lambda z: logit_adjusted_cross_entropy(z, p["labels"], p["counts"])),
        ("dakd", lambda z: dakd_loss(z[:, :known], p["old_logits"], p["lost"], T)),
    ):
        z = p["logits"].clone().requires_grad_(True)
        loss = fn(z)
        out[name] = (cwp.detached(loss), cwp.detached(torch.autograd.grad(loss, z)[0]))
    out["rho"] = normalized_entropy(p["lost"])
    return out


def run_ours(inputs: dict[str, Any]) -> Record:
    import timm
    from torch.optim import SGD
    from torch.optim.lr_scheduler import CosineAnnealingLR

    from pilot.backbones.backbone import Backbone
    from pilot.data.scenario import make_scenario
    from pilot.learners.dgr import DGR
    from pilot.runtime import Runtime

    arch = inputs["meta"]["arch"]
    vit = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    vit.load_state_dict(inputs["vit"], strict=True)
    backbone = Backbone(vit, arch, 224, None, None, pretrained=False)
    scenario = make_scenario(PER_SESSION * SESSIONS, PER_SESSION, PER_SESSION, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    sgd = partial(SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    cosine = partial(CosineAnnealingLR, T_max=1)
    memory = {"memory_size": 2000, "memory_per_class": 20, "fixed_memory": False}  # exps/dgr.json (unused here)
    learner = DGR.create(backbone, scenario, cpu, optimizer=sgd, scheduler=cosine, epochs=1, batch_size=BATCH, **memory)
    recorder = StepRecorder()
    recorder.backbone = learner.backbone.model
    recorder.head = lambda: (learner.head.weight, learner.head.bias)
    x_test, y_test = inputs["test"]
    sessions, initial = {}, None

    def train(s: int, batches: list, old: Any) -> None:
        if old is not None:
            learner.previous_network = lambda: old
        counts = torch.tensor(inputs["counts"][s], dtype=torch.float64)
        learner.train_reweighted([our_batch(x, y) for x, y in batches], counts, None, sgd, cosine, 1, f"DGR s{s}")
        learner.__dict__.pop("previous_network", None)

    with recorder.active():
        for info in scenario.sessions:
            s = info.index
            learner.train()
            learner.begin_session(info)
            with torch.no_grad():
                learner.head.weight[info.known :] = inputs["head_rows"][s]
                learner.head.bias[info.known :] = 0.0
            if s == 0:
                initial = learner.previous_network()
            else:  # "same": one step with the learner's own previous network (a copy of the current one)
                sessions["s1_same"] = same_step(learner, lambda: train(s, inputs["batches"][s][:1], None), recorder)
            train(s, inputs["batches"][s], initial if s else None)  # "distinct": the old network differs
            learner.eval()
            with torch.no_grad():
                logits = learner.predict(our_batch(x_test, y_test))
            head = learner.head
            sessions[f"s{s}"] = session_record(recorder.take(), learner.backbone.model, head.weight, head.bias, logits)
    return {
        "meta": common.our_meta(),
        "sessions": sessions,
        "pieces": our_pieces(inputs),
    }


# ------------------------------------------------------------------------------------------ compare
def cells(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    d = cwp.tensor_diff(a, b)
    return [d["shape"], cwp.fmt(d["max_abs"]), cwp.fmt(d["ref_max"]), cwp.fmt(d["rel"])]


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, t in sorted(tensors.items())])


def session_rows(s: str, mine: Record, theirs: Record) -> list[list[str]]:
    rows = [
        [s, "loss, every step"] + cells(mine["loss"], theirs["loss"]),
        [s, "head weight gradient, every step (reweighted)"] + cells(mine["head_w"], theirs["head_w"]),
        [s, "head bias gradient, every step (reweighted)"] + cells(mine["head_b"], theirs["head_b"]),
        [s, "backbone gradients, step 1 (all tensors)"]
        + cells(flat(mine["backbone_grad"]), flat(theirs["backbone_grad"])),
        [s, "backbone after the session"] + cells(flat(mine["backbone_after"]), flat(theirs["backbone_after"])),
        [s, "head weight after the session"] + cells(mine["head_w_after"], theirs["head_w_after"]),
        [s, "head bias after the session"] + cells(mine["head_b_after"], theirs["head_b_after"]),
        [s, "test logits"] + cells(mine["test_logits"], theirs["test_logits"]),
    ]
    return rows


def same_rows(mine: Record, theirs: Record) -> list[list[str]]:
    """Session 1's first step with the previous network equal to the current one: PILOT's old rows carry
    its rescaled rounding noise (norm = the reweighted CE part's), ours none."""
    k = PER_SESSION
    a, b = mine["head_w"][0], theirs["head_w"][0]
    return [
        ["s1, previous = current", "loss"] + cells(mine["loss"], theirs["loss"]),
        ["s1, previous = current", "head weight gradient, new classes' rows"] + cells(a[k:], b[k:]),
        ["s1, previous = current", "head weight gradient, old classes' rows"] + cells(a[:k], b[:k]),
        [
            "s1, previous = current",
            "  norm of ours / of PILOT's old rows",
            "",
            f"{float(a[:k].norm()):.3e}",
            f"{float(b[:k].norm()):.3e}",
            "",
        ],
    ]


def report(ours: Record, ref: Record) -> str:
    rows = []
    for s in ("s0", "s1"):
        rows += session_rows(s, ours["sessions"][s], ref["sessions"][s])
    rows += same_rows(ours["sessions"]["s1_same"], ref["sessions"]["s1_same"])
    piece_rows = []
    for name in ("kd", "logit_adjusted_ce", "dakd"):
        if name not in ref["pieces"]:
            continue
        (la, ga), (lb, gb) = ours["pieces"][name], ref["pieces"][name]
        who = "authors' _DAKD" if name == "dakd" else "PILOT"
        piece_rows.append([name, who, cwp.fmt(float((la - lb).abs())), f"{float(lb):.4f}"] + cells(ga, gb)[1:])
    if "rho" in ref["pieces"]:
        rho_a, rho_b = ours["pieces"]["rho"], ref["pieces"]["rho"]
        piece_rows.append(
            ["rho (normalised entropy)", "authors'", cwp.fmt(abs(rho_a - rho_b)), f"{rho_b:.6f}"] + [""] * 3
        )
    nan_steps = {s: bool(torch.isnan(r["head_w"]).any()) for s, r in ref["sessions"].items()}
    parts = [
        f"DGR fidelity ({ours['meta']['inputs'].get('arch', '')}): {common.headline(ours, ref, 10)}",
        "",
        cwp.table(["session", "quantity", "shape", "max abs diff", "ref max abs", "rel L2 diff"], rows),
        "",
        cwp.table(
            ["loss piece", "against", "loss abs diff", "ref loss", "grad max abs diff", "grad ref max", "grad rel"],
            piece_rows,
        ),
        "",
        f"NaN in PILOT's head gradients: {nan_steps}",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- CLI
def official_option(parser: Any, side: str) -> None:
    if side == "pilot":
        parser.add_argument("--official-src", type=Path, help="git clone of JiangpengHe/imbalanced_cil (DAKD check)")


if __name__ == "__main__":
    arch = {"add_make_arguments": lambda parser: parser.add_argument("--arch", default="vit_tiny_patch16_224")}
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, add_side_arguments=official_option, **arch)
