"""Throughput of every learner on the GPU, appended to ``results/bench.csv``.

    python scripts/bench.py                                   # every learner, both data kinds, + a whole SimpleCIL run
    python scripts/bench.py --methods l2p,coda --data synthetic --precision fp32
    python scripts/bench.py --methods coda --profile           # where one session's time goes
    python scripts/bench.py --methods l2p,dualprompt --data synthetic --compile reduce-overhead --warmup-sessions 2
    python scripts/bench.py --methods simplecil,l2p --data jpeg --gpu-decode on

Per learner (ViT-B/16 with random weights at 224 px, the method's YAML settings and reference
batch sizes, ``epochs=1``) two sessions of 10 classes run; session 0 is a warm-up (cuDNN
autotuning, allocator, caches of the first session's test images) and session 1 is timed:

``train_ips``    training images/s of ``train_session`` (one epoch over the session's images)
``fit_ips``      the same images over the whole ``fit``: training plus end-of-session work
                 (prototype passes, class statistics, classifier alignment)
``eval_ips``     test images/s of the evaluation after session 1 (all seen classes; frozen features
                 of earlier sessions cached as in a real run)
``feature_ips``  images/s of one frozen-backbone pass over the session's training images (test
                 transform; SimpleCIL's prototype pass)
``peak_mem_gb``  peak allocated GPU memory during session 1; ``session_s`` its wall time

``--warmup-sessions W`` (default 1) runs W untimed sessions before the timed one (10 classes each):
with ``--compile`` a learner's loss recompiles once more in session 1 (its class counts become
symbolic), so ``--warmup-sessions 2`` times the steady state. ``--compile`` (``runtime.compile``)
and ``--gpu-decode`` (``runtime.gpu_decode``) are written into the row's ``note``, with any compile
fallback.

Data: ``synthetic`` = CIFAR-shaped uint8 32x32 images (500 train / 100 test per class, upsampled
to 224 on the GPU, as CIFAR is); ``jpeg`` = a generated folder of JPEGs of ImageNet-R-like sizes
(256-640 px per side), decoded by loader workers. ``--whole-run`` also times a complete SimpleCIL
run of CIFAR-100 B0Inc10 on synthetic data (50,000 train and 10,000 test images).

The targets of issue 6 are printed beside the measurements. ``--tiny`` swaps in the test ViT and a
small dataset so the script itself can be checked on a CPU (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, open_dict  # noqa: E402

from pilot.config import compose_config  # noqa: E402
from pilot.data.pipeline import TRAIN  # noqa: E402
from pilot.loop import build_data, build_model, evaluate, run  # noqa: E402
from pilot.modules.features import extract_features  # noqa: E402
from pilot.registry import learner_names  # noqa: E402

# Issue 6 targets on an H100 (images/s): training, and evaluation (one-pass >= 4000, two-pass >= 2000).
TARGETS = {
    "simplecil": {"feature_ips": 5000, "eval_ips": 4000},
    "l2p": {"train_ips": 1200, "eval_ips": 2000},
    "dualprompt": {"train_ips": 1400, "eval_ips": 2000},
    "coda": {"train_ips": 1300, "eval_ips": 2000},
    "ease": {"train_ips": 1300},
    "slca": {"train_ips": 900, "eval_ips": 4000},
}
WHOLE_RUN_TARGET_S = 30.0
COLUMNS = [
    "timestamp",
    "commit",
    "device",
    "torch",
    "timm",
    "cuda",
    "method",
    "data",
    "precision",
    "batch_size",
    "eval_batch_size",
    "epochs",
    "train_images",
    "test_images",
    "train_ips",
    "fit_ips",
    "eval_ips",
    "feature_ips",
    "peak_mem_gb",
    "session_s",
    "whole_run_s",
    "note",
]


# ------------------------------------------------------------------------------------------- data
def _write_jpeg(job: tuple[Path, int]) -> None:
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = rng.integers(256, 641, size=2)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC)
    noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3)), 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: Path, classes: int, train_per_class: int, test_per_class: int) -> Path:
    """A ``root/train|test/<class>/`` folder of JPEGs with random sizes (created once, then reused)."""
    marker = root / f".complete_{classes}_{train_per_class}_{test_per_class}"
    if marker.exists():
        return root
    jobs = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{i:05d}.jpg", hash((split, c, i)) % 2**31) for i in range(per_class)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    marker.touch()
    return root


# ------------------------------------------------------------------------------------------ timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _config(method: str, data: list[str], args: argparse.Namespace) -> DictConfig:
    backbone = ["backbone=vit_test_tiny"] if args.tiny else ["backbone=vit_b16_in1k", "backbone.pretrained=false"]
    cfg = compose_config(
        [
            f"+method={method}",
            *data,
            *backbone,
            "logger=csv",
            "runtime.progress=false",
            f"runtime.precision={args.precision}",
            f"runtime.num_workers={args.workers}",
            f"runtime.device={args.device}",
            f"runtime.compile={args.compile}",
            f"runtime.gpu_decode={args.gpu_decode}",
        ]
    )
    with open_dict(cfg):
        if "epochs" in cfg.method:
            cfg.method.epochs = 1
        if "num_freeze_epochs" in cfg.method:  # LAE: the one timed epoch trains its PET too
            cfg.method.num_freeze_epochs = 0
    return cfg


def bench_learner(method: str, data_kind: str, data: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Two sessions of ``method``; the timings of the second (see the module docstring)."""
    cfg = _config(method, data, args)
    parts = build_data(cfg)
    model = build_model(cfg, parts)
    learner, pipeline, evaluator, runtime = model.learner, model.pipeline, model.evaluator, parts.runtime
    times: dict[str, float] = {}
    train_seconds: list[float] = []
    profiler = None
    warmup = args.warmup_sessions
    for info in parts.scenario.sessions[: warmup + 1]:
        session = pipeline.session(info)
        timed = info.index == warmup
        if timed and args.profile:
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if runtime.is_cuda else [])
            )
            profiler.__enter__()
        runtime.reset_peak_memory()
        _sync()
        start = time.perf_counter()
        learner.train()
        learner.begin_session(info)
        learner.train_session(session)
        _sync()
        trained = time.perf_counter()
        train_seconds.append(trained - start)
        learner.end_session(session)
        _sync()
        fitted = time.perf_counter()
        learner.eval()
        evaluate(learner, pipeline, evaluator, info)
        _sync()
        done = time.perf_counter()
        if profiler is not None:
            profiler.__exit__(None, None, None)
        if timed:
            times = {
                "train": trained - start,
                "fit": fitted - start,
                "eval": done - fitted,
                "session": done - start,
                "peak": runtime.peak_memory_mb() / 1024,
            }
    info = parts.scenario.sessions[warmup]
    n_train = len(pipeline.indices(TRAIN, info.new_classes))
    n_test = int(evaluator.n[: info.index + 1].sum())
    epochs = int(cfg.method.get("epochs", 0))
    note = ""
    # Learners that train in session 0 only (APER, RanPAC, FeCAM): session 1 has no training to time,
    # so the training rate comes from session 0 (which includes the warm-up) and fit_ips is left empty.
    first_session_only = epochs > 0 and train_seconds[warmup] < 0.02 * train_seconds[0]
    if first_session_only:
        n_train0 = len(pipeline.indices(TRAIN, parts.scenario.sessions[0].new_classes))
        times["train"] = train_seconds[0] * n_train / n_train0
        note = "trains in session 0 only: train_ips timed there (incl. warm-up); fit_ips n/a"
    feature_ips = _feature_pass(learner, pipeline.session(info), runtime, n_train)
    settings = [f"compile={args.compile}"] if args.compile != "off" else []
    settings += [f"gpu_decode={args.gpu_decode}"] if data_kind == "jpeg" else []
    settings += [f"warmup_sessions={warmup}"] if warmup != 1 else []
    settings += [f"compile fallback: {reason}" for reason in runtime.compile_failures.values()]
    note = "; ".join([note, *settings]) if note else "; ".join(settings)
    if profiler is not None:
        sort = "cuda_time_total" if runtime.is_cuda else "cpu_time_total"
        print(f"\n=== profile of {method} session {warmup} ({data_kind}) ===")
        print(profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows))
        if args.profile_trace:
            profiler.export_chrome_trace(str(Path(args.profile_trace) / f"trace_{method}_{data_kind}.json"))
    return {
        "method": method,
        "data": data_kind,
        "precision": args.precision,
        "batch_size": int(cfg.method.get("batch_size", 0)),
        "eval_batch_size": int(learner.eval_batch_size),
        "epochs": epochs,
        "train_images": n_train,
        "test_images": n_test,
        "train_ips": n_train * epochs / times["train"] if epochs else math.nan,
        "fit_ips": n_train * epochs / times["fit"] if epochs and not first_session_only else math.nan,
        "eval_ips": n_test / times["eval"],
        "feature_ips": feature_ips,
        "peak_mem_gb": times["peak"],
        "session_s": times["session"],
        "whole_run_s": math.nan,
        "note": note,
    }


def _feature_pass(learner, session, runtime, n_train: int) -> float:
    """Images/s of one frozen-backbone pass over the session's training images (test transform)."""
    backbone = learner.backbone
    was_training = backbone.training
    backbone.eval()
    _sync()
    start = time.perf_counter()
    extract_features(backbone, session.prototype_batches(512), runtime)
    _sync()
    backbone.train(was_training)
    return n_train / (time.perf_counter() - start)


def bench_whole_simplecil_run(args: argparse.Namespace) -> dict[str, Any]:
    """A complete SimpleCIL run of CIFAR-100 B0Inc10 on synthetic CIFAR-shaped data."""
    size = (
        ["dataset.num_classes=10", "dataset.train_per_class=20", "dataset.test_per_class=10"]
        if args.tiny
        else ["dataset.num_classes=100", "dataset.train_per_class=500", "dataset.test_per_class=100"]
    )
    cfg = _config("simplecil", ["dataset=synthetic", *size, "scenario=b0inc10"], args)
    with tempfile.TemporaryDirectory() as run_dir:
        _sync()
        start = time.perf_counter()
        table = run(cfg, run_dir)
        _sync()
        seconds = time.perf_counter() - start
    return {
        "method": "simplecil",
        "data": "synthetic-cifar100-b0inc10-run",
        "precision": args.precision,
        "batch_size": int(cfg.method.batch_size),
        "eval_batch_size": int(cfg.method.eval_batch_size),
        "epochs": 0,
        "train_images": int(cfg.dataset.num_classes * cfg.dataset.train_per_class),
        "test_images": int(table["n_test"].iloc[-1]),
        "whole_run_s": seconds,
        "note": f"A_last {table['acc'].iloc[-1]:.2f} (random weights)",
    }


# ------------------------------------------------------------------------------------------ output
def environment() -> dict[str, str]:
    import timm

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda or "",
    }


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: (
                        f"{v:.4g}"
                        if isinstance(v, float) and not math.isnan(v)
                        else ("" if isinstance(v, float) else v)
                    )
                    for k, v in row.items()
                }
            )


def print_summary(rows: list[dict[str, Any]], tiny: bool) -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    shown = [
        "method",
        "data",
        "batch_size",
        "train_ips",
        "fit_ips",
        "eval_ips",
        "feature_ips",
        "peak_mem_gb",
        "session_s",
        "whole_run_s",
    ]
    print(table[[c for c in shown if c in table]].to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if tiny:
        print("--tiny: a check of the script; these numbers are not comparable with the targets")
        return
    for row in rows:
        for metric, target in TARGETS.get(row["method"], {}).items():
            value = row.get(metric, math.nan)
            if isinstance(value, float) and not math.isnan(value):
                verdict = "meets" if value >= target else "MISSES"
                print(
                    f"target {row['method']:>10} {row['data']:<9} {metric:<11} >= {target:5d}: {value:8.1f}  {verdict}"
                )
        if not math.isnan(row.get("whole_run_s", math.nan)):
            verdict = "meets" if row["whole_run_s"] <= WHOLE_RUN_TARGET_S else "MISSES"
            seconds = row["whole_run_s"]
            target = f"target whole SimpleCIL CIFAR-100 B0Inc10 run <= {WHOLE_RUN_TARGET_S:.0f} s"
            print(f"{target}: {seconds:.1f} s  {verdict}")


# ----------------------------------------------------------------------------- paper-table estimate
def estimate_table(
    rows: Any, methods: list[str], seeds: int, dataset: str = "cifar100", scenario: str = "b0inc10"
) -> Any:
    """Estimated wall time of a paper table (every learner in ``methods`` x ``seeds`` runs of ``dataset``
    at its reference epochs) from the measured rates in ``rows`` (``results/bench.csv``: the latest
    synthetic row of each learner). Per run, with N_t training and M_t test images in session t::

        time = sum_t [ N_t * E_t / train_ips  +  N_t * E_t * (1 / fit_ips - 1 / train_ips)  +  M_<=t / eval_ips ]

    ``E_t``: the config's ``method.epochs`` (learners that train in session 0 only: 0 after it, plus a
    prototype pass ``N_t / feature_ips``); training-free learners pay ``N_t / feature_ips``. Start-up,
    loading and writing are left out; an estimate from the GPU the rows were measured on."""
    import pandas as pd

    cfg = compose_config(["+method=simplecil", f"dataset={dataset}", f"scenario={scenario}"])
    num_classes = {"cifar100": 100, "imagenet_r": 200}.get(dataset, 100)
    per_class_train, per_class_test = {"cifar100": (500, 100), "imagenet_r": (120, 30)}.get(dataset, (500, 100))
    init, step = int(cfg.scenario.init_cls), int(cfg.scenario.increment or cfg.scenario.init_cls)
    sizes = [init] + [step] * ((num_classes - init) // step)
    out = []
    for method in methods:
        measured = rows[(rows["method"] == method) & (rows["data"] == "synthetic")]
        if measured.empty:
            out.append({"method": method, "seeds": seeds, "run_s": math.nan, "total_s": math.nan, "note": "no row"})
            continue
        row = measured.iloc[-1]
        method_cfg = compose_config([f"+method={method}", f"dataset={dataset}", f"scenario={scenario}"]).method
        epochs = int(method_cfg.get("epochs", 0))
        first_only = "session 0 only" in str(row.get("note", ""))
        seconds, seen = 0.0, 0
        for t, n_classes in enumerate(sizes):
            n_train, seen = n_classes * per_class_train, seen + n_classes * per_class_test
            e = epochs if (epochs and (t == 0 or not first_only)) else 0
            if e:
                seconds += n_train * e / float(row["train_ips"])
                if not math.isnan(float(row["fit_ips"])):
                    seconds += n_train * e * (1 / float(row["fit_ips"]) - 1 / float(row["train_ips"]))
            if not e or first_only:
                seconds += n_train / float(row["feature_ips"])
            seconds += seen / float(row["eval_ips"])
        out.append(
            {
                "method": method,
                "epochs": epochs,
                "seeds": seeds,
                "run_s": seconds,
                "total_s": seconds * seeds,
                "device": row["device"],
                "note": "",
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(learner_names()), help="default: every registered learner")
    parser.add_argument("--data", default="synthetic,jpeg", help="synthetic, jpeg or both (comma-separated)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8, help="loader workers for the JPEG folder")
    parser.add_argument("--jpeg-dir", default=str(Path(tempfile.gettempdir()) / "pilot_bench_jpeg"))
    parser.add_argument("--whole-run", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench.csv"))
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of each timed session")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-trace", default=None, help="folder for Chrome traces of the profiled sessions")
    parser.add_argument("--tiny", action="store_true", help="test ViT and tiny data: checks the script on a CPU")
    parser.add_argument(
        "--table",
        action="store_true",
        help="measure nothing: estimate a paper table's time (--methods x --seeds on --table-dataset) from --out",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--compile", default="off", choices=["off", "default", "reduce-overhead"], help="runtime.compile"
    )
    parser.add_argument("--gpu-decode", default="auto", choices=["auto", "on", "off"], help="runtime.gpu_decode")
    parser.add_argument(
        "--warmup-sessions", type=int, default=1, help="untimed sessions before the timed one (10 classes each)"
    )
    parser.add_argument("--table-dataset", default="cifar100")
    args = parser.parse_args(argv)
    if args.table:
        import pandas as pd

        table = estimate_table(pd.read_csv(args.out), args.methods.split(","), args.seeds, args.table_dataset)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
        devices = ", ".join(sorted(table["device"].dropna().unique()))
        print(f"estimated paper table: {table['total_s'].sum() / 60:.1f} min (rates measured on {devices})")
        return 0

    per_session = 2 if args.tiny else 10
    classes, per_train, per_test = per_session * (args.warmup_sessions + 1), *((16, 8) if args.tiny else (500, 100))
    sources = {
        "synthetic": lambda: [
            "dataset=synthetic",
            f"dataset.num_classes={classes}",
            f"dataset.train_per_class={per_train}",
            f"dataset.test_per_class={per_test}",
            "dataset.image_size=32",
            f"scenario.init_cls={per_session}",
            f"scenario.increment={per_session}",
        ],
        "jpeg": lambda: [
            "dataset=image_folder",
            f"dataset.root={make_jpeg_folder(Path(args.jpeg_dir), classes, per_train, per_test)}",
            f"scenario.init_cls={per_session}",
            f"scenario.increment={per_session}",
        ],
    }
    env = environment()
    rows, failed = [], 0
    for data_kind in args.data.split(","):
        overrides = sources[data_kind]()
        for method in args.methods.split(","):
            print(f"--- {method} on {data_kind} ({args.precision}, {env['device']})", flush=True)
            try:
                row = {**env, **bench_learner(method, data_kind, overrides, args)}
            except Exception as error:  # one learner's failure must not cost the other rows
                print(f"!!! {method} on {data_kind} failed: {type(error).__name__}: {error}", flush=True)
                failed += 1
                continue
            append_rows(Path(args.out), [row])  # written at once: a timeout keeps the rows already measured
            rows.append(row)
            if runtime_is_cuda():
                torch.cuda.empty_cache()
    if args.whole_run:
        row = {**env, **bench_whole_simplecil_run(args)}
        append_rows(Path(args.out), [row])
        rows.append(row)
    print_summary(rows, args.tiny)
    print(f"appended {len(rows)} rows to {args.out}")
    return 1 if failed else 0


def runtime_is_cuda() -> bool:
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
