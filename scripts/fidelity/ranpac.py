"""Side-by-side check of our RanPAC learner (pilot/learners/ranpac.py) against LAMDA-PILOT's ``models/ranpac.py``.

Protocol (as scripts/compare_with_pilot.py and scripts/fidelity/aper.py, whose helpers this script imports)
----------------------------------------------------------------------------------------------------------
Both sides run on the CPU in float32 (ours: float64 for G, Q and the solves, as it always does) on the
same seeded *random* ViT-B/16 weights (timm key names), the same AdaptFormer adapter values (random
"trained" values, session 0's training being APER's and checked by scripts/fidelity/aper.py), the same
session-0 head scale sigma, the same random projection ``W`` (loaded into both sides) and the same
sample order. PILOT's learner is its own class (``models.ranpac.Learner``) built from
``exps/ranpac.json``; its statistics run through its own ``setup_RP`` + ``replace_fc`` (which calls
``optimise_ridge_parameter``), its evaluation through its network's forward. Ours: ``begin_session``,
``end_session``, ``predict``. Two cases, each two sessions:

* ``images``: 2 x 4 classes, 8 images per session (224 px) through the adapted ViT on both sides,
  ``M = --projection-dim``. Checks the whole path (tuned feature -> h -> G, Q -> lambda -> W_o -> logits);
  with 8 samples the lambda search is degenerate, so
* ``features``: 2 x 10 classes, ``--per-class`` samples per class of synthetic 768-d features shaped
  like the ViT's (class means and spread drawn around the mean and spread of the images' features),
  fed in place of the backbone's output (PILOT: ``backbone`` replaced by the identity; ours:
  ``tuned_features``). With the defaults, 1,000 samples per session and M = 2,000: the fit part of the
  lambda search (800) has fewer samples than M, as PILOT's CIFAR setting (4,000 < 10,000).

Recorded per session: G, Q, the held-out MSE of every lambda (PILOT: each ``F.mse_loss`` its search
computes), the chosen lambda, the readout rows W_o^T of the seen classes, eval logits and predictions
(``features``: 200 held-out test features; ``images``: all 16 images).

Commands::

    .venv/bin/python scripts/fidelity/ranpac.py make-inputs --out /tmp/ranpac_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/ranpac.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/ranpac_fid --out /tmp/ranpac_fid/pilot.pt
    .venv/bin/python scripts/fidelity/ranpac.py ours --inputs /tmp/ranpac_fid --out /tmp/ranpac_fid/ours.pt
    .venv/bin/python scripts/fidelity/ranpac.py compare /tmp/ranpac_fid/pilot.pt /tmp/ranpac_fid/ours.pt \\
        --markdown /tmp/ranpac_fid/table.md

scripts/fidelity/fecam.py uses the same inputs (``make-inputs`` here writes them).
"""

from __future__ import annotations

import importlib
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import common
import torch
from aper import FakeSession, load_values, our_pet, pilot_pet, shared_weights
from common import Record, cwp

DIM, DEPTH, RANK = 768, 12, 64
CASES = {"images": (4, 2), "features": (10, 2)}  # classes per session, sessions
SIGMA = 1.7  # the session-0 head's "trained" scale, carried over by both sides


# --------------------------------------------------------------------------------------- make-inputs
def synthetic_features(reference: torch.Tensor, classes: int, per_class: int, gen: torch.Generator):
    """Class-clustered features around the mean / spread of ``reference`` ``[n, 768]``: class-major."""
    mean, spread = reference.mean(0), reference.std(0) + 1e-3
    centres = mean + spread * torch.randn(classes, DIM, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 0.8 * spread * torch.randn(len(labels), DIM, generator=gen), labels


def make_inputs(out: Path, seed: int, projection_dim: int, per_class: int) -> None:
    import timm

    from pilot.backbones.adapters import AdapterSet, adapters_active

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    gen = torch.Generator().manual_seed(seed + 1)

    def uniform(bound: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    adapter = {
        f"blocks.{i}.{name}": t
        for i in range(DEPTH)
        for name, t in (
            ("down.weight", uniform(DIM**-0.5, RANK, DIM)),
            ("down.bias", uniform(0.05, RANK)),
            ("up.weight", uniform(RANK**-0.5, DIM, RANK)),
            ("up.bias", uniform(0.05, DIM)),
        )
    }
    per, sessions = CASES["images"]
    images = [cwp.random_images(2 * per, gen) for _ in range(sessions)]
    labels = [torch.arange(s * per, (s + 1) * per).repeat(2) for s in range(sessions)]  # not class-sorted
    pet = AdapterSet.for_vit(vit, RANK, 0.0, 0.1).eval()
    with torch.no_grad():
        for i, block in enumerate(pet):
            for part in ("down", "up"):
                for kind in ("weight", "bias"):
                    getattr(getattr(block, part), kind).copy_(adapter[f"blocks.{i}.{part}.{kind}"])
        with adapters_active(vit, [pet]):
            reference = vit(torch.cat(images))  # the tuned features: what the synthetic ones imitate
    per, sessions = CASES["features"]
    train_feats, train_labels = synthetic_features(reference, per * sessions, per_class + 10, gen)
    held = torch.arange(len(train_labels)) % (per_class + 10) >= per_class  # 10 per class for testing
    feats, labels_f = train_feats[~held], train_labels[~held]
    features = []
    for s in range(sessions):
        mine = (labels_f >= s * per) & (labels_f < (s + 1) * per)
        order = torch.randperm(int(mine.sum()), generator=gen)  # the shuffled loader order
        features.append((feats[mine][order], labels_f[mine][order]))
    inputs = {
        "meta": common.input_meta(seed),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "adapter": adapter,
        "sigma": torch.tensor([SIGMA]),
        "projection": torch.randn(DIM, projection_dim, generator=gen),
        "images": {"train": list(zip(images, labels)), "test": (torch.cat(images), torch.cat(labels))},
        "features": {"train": features, "test": (train_feats[held], train_labels[held])},
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, out / "inputs.pt")
    print(f"wrote {out / 'inputs.pt'} (M = {projection_dim}, {len(features[0][1])} feature samples per session)")


# --------------------------------------------------------------------------------- LAMDA-PILOT side
def pilot_learner(pilot_src: Path, name: str, inputs: dict[str, Any], classes: int, identity: bool) -> Any:
    """PILOT's learner ``models.<name>`` from its JSON, on the CPU, adapter values loaded (dropout 0)."""
    args = json.loads((pilot_src / "exps" / f"{name}.json").read_text())
    args.update(device=["cpu"], nb_classes=classes, M=inputs["projection"].shape[1])
    learner = importlib.import_module(f"models.{name}").Learner(args)
    load_values(pilot_pet(learner._network.backbone, "adapter"), inputs["adapter"])
    if identity:
        learner._network.backbone = torch.nn.Identity()
        learner._network.backbone.out_dim = DIM
    return learner


class Recorder:
    """Wraps a module's ``F`` so that every ``mse_loss`` it computes is kept (the lambda search's errors)."""

    def __init__(self, module: Any) -> None:
        self.module, self.original, self.losses = module, module.F, []
        outer = self

        class Functional:
            def __getattr__(self, name: str) -> Any:
                return getattr(outer.original, name)

            @staticmethod
            def mse_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
                loss = outer.original.mse_loss(*args, **kwargs)
                outer.losses.append(float(loss))
                return loss

        module.F = Functional()

    def take(self) -> list[float]:
        losses, self.losses = self.losses, []
        return losses


def pilot_case(pilot_src: Path, inputs: dict[str, Any], case: str) -> Record:
    per, sessions = CASES[case]
    data = inputs[case]
    learner = pilot_learner(pilot_src, "ranpac", inputs, per * sessions, identity=case == "features")
    recorder = Recorder(sys.modules["models.ranpac"])
    net, record = learner._network, {}
    for s in range(sessions):
        x, y = data["train"][s]
        learner._cur_task, learner._known_classes, learner._total_classes = s, s * per, (s + 1) * per
        net.update_fc((s + 1) * per)
        if s == 0:
            with torch.no_grad():
                net.fc.sigma.fill_(float(inputs["sigma"]))
            learner.setup_RP()
            learner.W_rand = net.W_rand = inputs["projection"].clone()
        chosen: list[Any] = []
        search = type(learner).optimise_ridge_parameter

        def keep(h: torch.Tensor, t: torch.Tensor) -> Any:
            chosen.append(search(learner, h, t))  # np.float64, returned as is
            return chosen[-1]

        learner.optimise_ridge_parameter = keep
        learner.replace_fc(cwp.one_batch(x, y), net, None)
        net.eval()
        with torch.no_grad():
            out = net(data["test"][0])
            feature = net.extract_vector(data["test"][0])
        seen = data["test"][1] < (s + 1) * per
        record[f"s{s}"] = {
            "feature": cwp.detached(feature),
            "h": cwp.detached(out["features"]),
            "G": cwp.detached(learner.G),
            "Q": cwp.detached(learner.Q),
            "losses": torch.tensor(recorder.take(), dtype=torch.float64),
            "lambda": float(chosen[0]),
            "readout": cwp.detached(net.fc.weight[: (s + 1) * per]),
            "logits": cwp.detached(out["logits"][seen][:, : (s + 1) * per]),
            "sigma": float(net.fc.sigma),
        }
    return record


def run_pilot(pilot_src: Path, inputs: dict[str, Any], case_fn: Callable[..., Record] = pilot_case) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    shared_weights(inputs["vit"])
    return {
        "meta": common.pilot_meta(pilot_src),
        "cases": {case: case_fn(pilot_src, inputs, case) for case in CASES},
    }


# ----------------------------------------------------------------------------------------- our side
def our_learner(cls: Any, inputs: dict[str, Any], classes: int, sessions: int, identity: bool, **kwargs: Any) -> Any:
    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(classes * sessions, classes, classes, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    backbone = cwp.our_backbone(inputs["vit"])
    sgd = partial(torch.optim.SGD, lr=0.01)  # required of a learner that trains; unused (session 0 is frozen here)
    learner = cls.create(backbone, scenario, cpu, optimizer=sgd, adapter_dropout=0.0, cache_features=False, **kwargs)
    if identity:
        learner.tuned_features = lambda images: images  # the features stand in for the adapted ViT's output
    return learner


def start_session(learner: Any, info: Any, inputs: dict[str, Any]) -> None:
    """``begin_session``; in session 0 the shared "trained" adapter and sigma are loaded and frozen."""
    learner.begin_session(info)
    if info.index == 0:
        load_values(our_pet(learner, "adapter"), inputs["adapter"])
        load_values({"sigma": learner.first_head.sigma}, {"sigma": inputs["sigma"]})
        learner.freeze_tuned()  # session 0's training is APER's (scripts/fidelity/aper.py)


def our_sessions(learner: Any, inputs: dict[str, Any], data: Record) -> Iterator[tuple[Any, ...]]:
    """Runs each session of ``learner`` on the case's training data, then yields (info, test x, test y, the test
    samples of the seen classes) with the learner in eval mode."""
    for info in learner.scenario.sessions:
        learner.train()
        start_session(learner, info, inputs)
        learner.end_session(FakeSession(info, *data["train"][info.index]))
        learner.eval()
        x, y = data["test"]
        yield info, x, y, y < info.total


def our_case(inputs: dict[str, Any], case: str) -> Record:
    from pilot.learners.ranpac import RanPAC
    from pilot.modules import ridge

    per, sessions = CASES[case]
    data = inputs[case]
    m = inputs["projection"].shape[1]
    learner = our_learner(RanPAC, inputs, per, sessions, case == "features", projection_dim=m)
    with torch.no_grad():
        learner.statistics.projection.copy_(inputs["projection"])
    found: list[torch.Tensor] = []
    original = ridge.select_ridge

    def spy(*args: Any, **kwargs: Any) -> tuple[float, torch.Tensor]:
        result = original(*args, **kwargs)
        found.append(result[1])
        return result

    ridge.select_ridge = spy  # type: ignore[assignment]
    record = {}
    for info, x, y, seen in our_sessions(learner, inputs, data):
        with torch.no_grad():
            feature = learner.tuned_features(x)
        record[f"s{info.index}"] = {
            "feature": cwp.detached(feature),
            "h": cwp.detached(learner.statistics.expand(feature)),
            "G": cwp.detached(learner.statistics.gram),
            "Q": cwp.detached(learner.statistics.targets),
            "losses": found[-1],
            "lambda": float(learner.ridge),
            "readout": cwp.detached(learner.readout),
            "logits": cwp.detached(learner.predict(cwp.our_batch(x[seen], y[seen], "test"))),
            "sigma": float(learner.first_head.sigma),
        }
    ridge.select_ridge = original  # type: ignore[assignment]
    return record


def run_ours(inputs: dict[str, Any], case_fn: Callable[..., Record] = our_case) -> Record:
    return {
        "meta": common.our_meta(),
        "cases": {case: case_fn(inputs, case) for case in CASES},
    }


# ------------------------------------------------------------------------------------------ compare
def diff_cells(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    d = cwp.tensor_diff(a, b)
    return [cwp.fmt(d["max_abs"]), cwp.fmt(d["rel"])]


def report(ours: Record, ref: Record) -> str:
    rows, losses = [], []
    for case, mine in ours["cases"].items():
        for session, a in mine.items():
            b = ref["cases"][case][session]
            rows.append(
                [case, session, f"{b['lambda']:g} / {a['lambda']:g}"]
                + diff_cells(a["feature"], b["feature"])[1:]
                + diff_cells(a["h"], b["h"])[1:]
                + diff_cells(a["G"], b["G"])[1:]
                + diff_cells(a["Q"], b["Q"])[1:]
                + diff_cells(a["readout"], b["readout"])[1:]
                + diff_cells(a["logits"], b["logits"])
                + [cwp.same_count(a["logits"].argmax(1), b["logits"].argmax(1))]
            )
            ratio = (a["losses"] - b["losses"]).abs() / b["losses"].abs()
            pick = min(range(len(b["losses"])), key=lambda i: float(b["losses"][i]))
            losses.append([case, session, cwp.fmt(float(ratio.max())), cwp.fmt(float(ratio[pick]))])
    head = f"{common.headline(ours, ref, 40)}; CPU, float32 "
    head += "(ours: G, Q, solves in float64; PILOT: float32)."
    return "\n".join(
        [
            head,
            "",
            "lambda: PILOT / ours; f (tuned feature of the test inputs), h = ReLU(f W), G, Q, W_o: relative L2",
            "||ours - PILOT|| / ||PILOT||; logits: max abs, rel; top-1: test predictions that agree.",
            "",
            cwp.table(
                ["case", "session", "lambda", "f rel", "h rel", "G rel", "Q rel", "W_o rel"]
                + ["logits max abs", "logits rel", "top-1"],
                rows,
            ),
            "",
            "Held-out MSE of the lambda search: relative difference, worst candidate and PILOT's chosen one.",
            "",
            cwp.table(["case", "session", "worst lambda", "chosen lambda"], losses),
        ]
    )


# ------------------------------------------------------------------------------- scale (GPU) check
def pilot_float32_search(h: torch.Tensor, y: torch.Tensor, candidates: list[float]) -> float:
    """PILOT's lambda search as it computes it: float32 G, Q and solves (no TF32)."""
    n = int(h.shape[0] * 0.8)
    g, q = h[:n].T @ h[:n], h[:n].T @ y[:n]
    eye = torch.eye(g.shape[0], device=g.device)
    losses = [float(((h[n:] @ torch.linalg.solve(g + lam * eye, q) - y[n:]) ** 2).mean()) for lam in candidates]
    finite = [v if v == v else float("inf") for v in losses]
    return candidates[finite.index(min(finite))]


def scale_check(device: str, projection_dim: int, per_class: int, classes: int, sessions: int, noise: float) -> Record:
    """RanPAC's statistics and FeCAM's store at full size on synthetic class-clustered 768-d features:
    time and peak memory of each step, and our float64 arithmetic against PILOT's float32 one."""
    import time

    from pilot.modules.mahalanobis import ClassMahalanobis
    from pilot.modules.ridge import RIDGE_CANDIDATES, RidgeStatistics, ridge_solution

    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # PILOT's float32 (torch's default)
    gen = torch.Generator().manual_seed(0)
    total = classes * sessions
    centres = torch.randn(DIM, generator=gen) + 0.15 * torch.randn(total, DIM, generator=gen)  # common + class part

    def draw(first: int, count: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(first, first + count).repeat_interleave(n)
        order = torch.randperm(len(labels), generator=gen)
        feats = centres[labels] + noise * torch.randn(len(labels), DIM, generator=gen)
        return feats[order].to(dev), labels[order].to(dev)

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - start

    def peak_mb() -> float:
        return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")

    test_x, test_y = draw(0, total, 20)
    stats = RidgeStatistics(DIM, projection_dim, total, generator=gen).to(dev)
    g32 = torch.zeros(projection_dim, projection_dim, device=dev)
    q32 = torch.zeros(projection_dim, total, device=dev)
    store = ClassMahalanobis(DIM)
    store.to(dev).grow(total)
    rows = []
    for s in range(sessions):
        x, y = draw(s * classes, classes, per_class)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _, t_update = timed(lambda: stats.update(x, y))
        (lam, _), t_search = timed(lambda: stats.select_ridge(x, y))
        w64, t_solve = timed(lambda: stats.solve(lam))
        ridge_peak = peak_mb()
        h32 = torch.relu(x @ stats.projection)
        y32 = torch.nn.functional.one_hot(y, total).float()
        g32 += h32.T @ h32
        q32 += h32.T @ y32
        lam32 = pilot_float32_search(h32, y32, list(RIDGE_CANDIDATES))
        w32 = torch.linalg.solve(g32 + lam32 * torch.eye(projection_dim, device=dev), q32)
        w64_at32 = ridge_solution(stats.gram, stats.targets, lam32)
        seen = test_y < (s + 1) * classes
        h_test = stats.expand(test_x[seen])
        rows_seen = slice(0, (s + 1) * classes)
        normed = torch.nn.functional.normalize
        pred64 = (normed(h_test, dim=1) @ normed(w64.T[rows_seen], dim=1).T).argmax(1)
        pred32 = (normed(h_test.float(), dim=1) @ normed(w32.T[rows_seen], dim=1).T).argmax(1)
        agree = float((pred64 == pred32).float().mean())
        acc64, acc32 = (float((p == test_y[seen]).float().mean()) for p in (pred64, pred32))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _, t_fecam = timed(lambda: store.update(x, y, range(s * classes, (s + 1) * classes)))
        fecam_peak = peak_mb()
        _, t_dist = timed(lambda: store(test_x[seen]))
        eig = torch.linalg.eigvalsh(stats.gram)
        rows.append(
            {
                "session": s,
                "lambda ours / PILOT-float32": f"{lam:g} / {lam32:g}",
                "G eig max": float(eig.max()),
                "W_o rel (float32 vs float64, same lambda)": float((w32.double() - w64_at32).norm() / w64_at32.norm()),
                "top-1 agree float32/float64": agree,
                "acc float64 / float32": f"{acc64:.4f} / {acc32:.4f}",
                "t update / search / solve (s)": f"{t_update:.2f} / {t_search:.2f} / {t_solve:.2f}",
                "ridge peak MB": ridge_peak,
                "t fecam update / distances (s)": f"{t_fecam:.2f} / {t_dist:.3f}",
                "fecam peak MB": fecam_peak,
                "test samples": int(seen.sum()),
            }
        )
        print(rows[-1], flush=True)
    return {"device": str(dev), "M": projection_dim, "per session": classes * per_class, "rows": rows}


# ---------------------------------------------------------------------------------------------- CLI
def add_make_arguments(parser: Any) -> None:
    parser.add_argument("--projection-dim", type=int, default=2000)
    parser.add_argument("--per-class", type=int, default=100)


def add_scale_arguments(parser: Any) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--projection-dim", type=int, default=10000)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--out", type=Path)


def run_scale(args: Any) -> None:
    result = scale_check(args.device, args.projection_dim, args.per_class, args.classes, args.sessions, args.noise)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def main(
    pilot_fn: Callable[..., Record] = run_pilot,
    ours_fn: Callable[..., Record] = run_ours,
    report_fn: Callable[[Record, Record], str] = report,
) -> None:
    """The command line of this script and of fecam.py (its own sides and report, the same inputs)."""
    scale = ("full-size statistics on synthetic features (timing, memory, float32)", add_scale_arguments, run_scale)
    common.main(__doc__, make_inputs, pilot_fn, ours_fn, report_fn, add_make_arguments=add_make_arguments,
                commands={"scale": scale})  # fmt: skip


if __name__ == "__main__":
    main()
