"""What the fidelity scripts share: the prologue, the command line, comparison rows and report headlines.

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` (before torch loads OpenMP) and puts ``scripts/`` on
``sys.path``, so that ``cwp`` here is ``scripts/compare_with_pilot.py`` (the shared fidelity helpers).
Every script's command line is ``make-inputs --out DIR [--seed N ...]``, ``pilot --pilot-src SRC --inputs DIR
--out FILE``, ``ours --inputs DIR --out FILE``, ``compare PILOT_FILE OURS_FILE [--markdown FILE]``, built by
:func:`main` with the script's own options and functions.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (shared 2-core machines)
SCRIPTS = str(Path(__file__).resolve().parents[1])
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)  # scripts/: compare_with_pilot

import compare_with_pilot as cwp  # noqa: E402
import torch  # noqa: E402

Record = dict[str, Any]
NUM_CLASSES, INCREMENT, DIM = 100, 10, 768  # CIFAR-100 B0Inc10 (the exps/*.json setting), ViT-B/16 features
KNOWN, TOTAL = 10, 20  # the classes seen before and after session 1
DIFF_HEADER = ["quantity", "shape", "max abs diff", "ref max abs", "rel L2 diff"]
BASE_OPTIONS = {"make-inputs": ("out", "seed"), "pilot": ("inputs", "out", "pilot_src"), "ours": ("inputs", "out")}


# ------------------------------------------------------------------------------------- recorders
@contextlib.contextmanager
def recorded_sgd_steps(store: list, record: Callable[[torch.optim.SGD], Record]) -> Iterator[None]:
    """Within this context ``SGD.step`` appends ``record(optimizer)`` to ``store`` and leaves the parameters
    alone (both sides then compare the same, untrained, weights at every step)."""
    original = torch.optim.SGD.step

    def step(self: torch.optim.SGD, closure: Callable | None = None) -> None:
        store.append(record(self))

    torch.optim.SGD.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]


def named_grads(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """The gradients of the optimiser's parameters, by the names ``names`` gives their ids."""
    return {
        names[id(p)]: cwp.detached(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
    }


# ------------------------------------------------------------------------------------------ inputs
def seeded_vit(seed: int, arch: str = "vit_base_patch16_224") -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """The random ``arch`` weights drawn after ``torch.manual_seed(seed)`` (timm names, no head) and a
    generator seeded with ``seed + 1`` for the rest of the inputs."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.Generator().manual_seed(seed + 1)


def input_meta(seed: int, **extra: Any) -> Record:
    return {"seed": seed, **extra, "made_with": cwp.versions(), "our_commit": cwp.git_commit(Path(__file__).parent)}


def pilot_meta(pilot_src: Path, **extra: Any) -> Record:
    return {**cwp.versions(), "side": "LAMDA-PILOT", "pilot_commit": cwp.git_commit(pilot_src), **extra}


def our_meta(**extra: Any) -> Record:
    return {**cwp.versions(), "side": "ours", "our_commit": cwp.git_commit(Path(__file__).parent), **extra}


def save_inputs(inputs: Record, out: Path, note: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, out / "inputs.pt")
    print(f"wrote {out / 'inputs.pt'}{note}")


# ----------------------------------------------------------------------------------------- compare
def diff_row(label: str, ours: torch.Tensor, ref: torch.Tensor) -> list[str]:
    """``[label, shape, max abs diff, ref max abs, rel L2 diff]``; entries where the reference is not finite
    (e.g. PILOT's 0/0) are left out and counted in the shape cell."""
    finite = torch.isfinite(ref)
    if ours.shape == ref.shape and not finite.all():
        d = cwp.tensor_diff(ours[finite], ref[finite])
        d["shape"] = f"{cwp.tensor_diff(ref, ref)['shape']} ({int((~finite).sum())} NaN in PILOT)"
    else:
        d = cwp.tensor_diff(ours, ref)
    return [label, d["shape"], cwp.fmt(d["max_abs"]), cwp.fmt(d.get("ref_max", math.inf)), cwp.fmt(d["rel"])]


def grouped_rows(label: str, what: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[list[str]]:
    """The tensors of ``ref`` as one vector, and the worst single tensor (relative L2 over finite entries)."""
    keys = sorted(ref)
    whole = diff_row(
        f"{label}: {what} ({len(keys)} tensors)",
        torch.cat([ours[k].flatten() for k in keys]),
        torch.cat([ref[k].flatten() for k in keys]),
    )
    worst = max(keys, key=lambda k: cwp.tensor_diff(ours[k][ref[k].isfinite()], ref[k][ref[k].isfinite()])["rel"])
    return [whole, diff_row(f"{label}: worst tensor `{worst}`", ours[worst], ref[worst])]


def headline(ours: Record, ref: Record, digits: int = 7) -> str:
    """``LAMDA-PILOT <commit> (torch, timm) vs ours <commit> (torch, timm)`` from the two records' meta."""
    a, b = ours["meta"], ref["meta"]
    return (
        f"LAMDA-PILOT {b.get('pilot_commit', '?')[:digits]} (torch {b['torch']}, timm {b['timm']}) vs ours "
        f"{a.get('our_commit', '?')[:digits]} (torch {a['torch']}, timm {a['timm']})"
    )


def diff_report(notes: list[str], rows: list[list[str]], header: list[str] = DIFF_HEADER, sep: str = "\n") -> str:
    """The notes, then the table of ``rows``."""
    return sep.join(notes) + "\n\n" + cwp.table(header, rows)


# ---------------------------------------------------------------------------------------------- CLI
Command = tuple[str, Callable[[argparse.ArgumentParser], Any], Callable[[argparse.Namespace], None]]


def main(
    doc: str | None,
    make_inputs: Callable[..., None],
    run_pilot: Callable[..., Record],
    run_ours: Callable[..., Record],
    report: Callable[[Record, Record], str],
    *,
    batch: int | None = None,
    add_make_arguments: Callable[[argparse.ArgumentParser], Any] | None = None,
    add_side_arguments: Callable[[argparse.ArgumentParser, str], Any] | None = None,
    commands: dict[str, Command] | None = None,
    argv: list[str] | None = None,
) -> None:
    """Parse the command line and run its sub-command.

    ``make_inputs(out, seed, **options)``, ``run_pilot(pilot_src, inputs, **options)`` and ``run_ours(inputs,
    **options)`` get the options the script adds by their names: ``batch`` (the default of ``make-inputs
    --batch``), ``add_make_arguments(parser)``, ``add_side_arguments(parser, "pilot" | "ours")``. A side's
    result gets ``meta.inputs`` and is saved to ``--out``; ``compare`` prints ``report(ours, pilot)``.
    ``commands``: more sub-commands, name -> (help, add its arguments, run it on the parsed arguments)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-inputs", help="the shared inputs (our venv)")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=0)
    if batch is not None:
        make.add_argument("--batch", type=int, default=batch)
    if add_make_arguments:
        add_make_arguments(make)
    for name, help in (("pilot", "run LAMDA-PILOT's code (its venv)"), ("ours", "run our code (our venv)")):
        side = sub.add_parser(name, help=help)
        if name == "pilot":
            side.add_argument("--pilot-src", type=Path, required=True)
        side.add_argument("--inputs", type=Path, required=True)
        side.add_argument("--out", type=Path, required=True)
        if add_side_arguments:
            add_side_arguments(side, name)
    compare = sub.add_parser("compare", help="print the differences; --markdown writes them too")
    compare.add_argument("pilot_file", type=Path)
    compare.add_argument("ours_file", type=Path)
    compare.add_argument("--markdown", type=Path)
    for name, (help, add_arguments, _) in (commands or {}).items():
        add_arguments(sub.add_parser(name, help=help))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = ("command", "threads", *BASE_OPTIONS.get(args.command, ()))
    options = {k: v for k, v in vars(args).items() if k not in skip}
    if args.command == "make-inputs":
        make_inputs(args.out, args.seed, **options)
    elif args.command in ("pilot", "ours"):
        inputs = cwp.load_inputs(args.inputs)
        if args.command == "pilot":
            result = run_pilot(args.pilot_src, inputs, **options)
        else:
            result = run_ours(inputs, **options)
        result["meta"]["inputs"] = inputs["meta"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.out)
        print(f"wrote {args.out}")
    elif args.command == "compare":
        text = report(torch.load(args.ours_file, weights_only=False), torch.load(args.pilot_file, weights_only=False))
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
            print(f"\nwrote {args.markdown}")
    else:
        (commands or {})[args.command][2](args)
