"""Prepare a dataset root from a downloaded archive or folder, and recheck it later.

``python -m pilot.data prepare NAME --source PATH [--root DIR] [--split S]`` (also ``pilot-data``):

1. checks the archive against its published MD5 (:data:`pilot.data.sources.KNOWN_ARCHIVES`; an
   archive without a published checksum is used with a note, ``--no-checksum`` skips the check);
2. recognises the layout of the source: train/test class folders (the APER/RevisitingCIL archives,
   or any ``image_folder``), class folders without a split (the original ImageNet-R/-A archives),
   CUB-200-2011's own archive, or CIFAR-100's python pickles; anything else is refused, naming what
   is wrong;
3. applies the split (:mod:`pilot.data.splits`) and writes the files straight to their place in the
   root: extracted from an archive (through a sibling staging folder that is renamed into place, so
   a root is either complete or absent), or linked to a source folder (a symlink per folder or per
   file), or used in place when the root *is* the source folder: nothing is copied twice;
4. writes ``manifest.csv``, ``manifest.sha256`` and ``prepared.json`` (:mod:`pilot.data.manifest`)
   and prints the classes, images per split and the manifest hash.

Running it again with the same source verifies the root and changes nothing. ``--verify`` (no
source) rechecks a prepared root against its manifest. Every refusal is a :class:`SourceError`
(exit status 2) that says what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pilot
from pilot.data import manifest as mf
from pilot.data import splits
from pilot.data.sources import (
    KNOWN_ARCHIVES,
    ArchiveSource,
    ChecksumStatus,
    FolderSource,
    Listing,
    SourceError,
    check_archive,
    open_source,
    remove_tree,
)
from pilot.resources import shipped_dir

manifest_hash = mf.manifest_hash  # the short hash a run records: pilot.data.manifest.manifest_hash(root)
CONFIG_DIR = shipped_dir("configs", "train.yaml")
DATA_DIR_ENV = "PILOT_DATA_DIR"  # configs/paths/default.yaml: data_dir: ${oc.env:PILOT_DATA_DIR,data}
DATA_DIR_DEFAULT = "data"


# ------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class SplitRule:
    """How train and test are decided, where the rule comes from, and the counts it publishes."""

    description: str
    source: str
    published: str  # e.g. "24,000 / 6,000", or "unknown" when nobody published counts


APER_SOURCE = "https://github.com/zhoudw-zdw/RevisitingCIL#dataset (README: processed datasets, train/ and test/)"
SPLIT_RULES: dict[str, SplitRule] = {
    "aper": SplitRule(
        "the train/ and test/ folders of the APER/RevisitingCIL archive, as they come",
        APER_SOURCE,
        "unknown (the APER authors publish the archives, not the counts)",
    ),
    "given": SplitRule("the source's own train/ and test/ folders, as they come", "the source", "unknown"),
    "dualprompt": SplitRule(
        "DualPrompt/L2P: torch.randperm over the ImageFolder order of the 30,000 images, generator seeded 42; "
        "the first int(0.8 n) go to train (one global permutation, not per class)",
        splits.DUALPROMPT_SOURCE,
        "24,000 / 6,000",
    ),
    "coda": SplitRule(
        "CODA-Prompt's fixed lists dataloaders/splits/imagenet-r_{train,test}.yaml",
        splits.CODA_IMAGENET_R.source,
        "24,000 / 6,000",
    ),
    "official": SplitRule(
        "CUB-200-2011's train_test_split.txt (is_training_image 1 = train); not known to equal APER's split",
        splits.CUB_SOURCE,
        "5,994 / 5,794",
    ),
    "torchvision": SplitRule(
        "CIFAR-100's own train and test batches (torchvision.datasets.CIFAR100)",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        "50,000 / 10,000",
    ),
}
# Which file list a file-list split reads (a table, so that tests can put in a small one).
FILE_LISTS: dict[str, splits.FileListSplit] = {"coda": splits.CODA_IMAGENET_R}


@dataclass(frozen=True)
class DatasetSpec:
    """What ``prepare NAME`` accepts and produces."""

    name: str
    layout: str  # manifest layout: image_folder | cifar
    config: str | None  # configs/dataset/<config>.yaml, whose dataset.root gives the default root
    splits: Mapping[str, tuple[str, ...]]  # source layout -> allowed splits (the first is the default)
    num_classes: int | None  # refuse another class count (None: any)
    unsplit_images: int | None = None  # images a class-folders-only source must hold (None: any)
    hint: str = ""  # where the reference source is to be had


APER_ONLY = {"presplit": ("aper",)}
APER_HINT = "Download the APER/RevisitingCIL archive linked in https://github.com/zhoudw-zdw/RevisitingCIL#dataset"
DATASETS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec(
        "cifar100",
        "cifar",
        "cifar100",
        {"cifar": ("torchvision",)},
        100,
        hint="Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "imagenet_r": DatasetSpec(
        "imagenet_r",
        "image_folder",
        "imagenet_r",
        {"presplit": ("aper",), "unsplit": ("dualprompt", "coda")},
        200,
        unsplit_images=30000,
        hint=f"{APER_HINT} (imagenet-r.zip), or https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar "
        "with --split dualprompt or --split coda",
    ),
    "imagenet_a": DatasetSpec(
        "imagenet_a", "image_folder", "imagenet_a", APER_ONLY, 200, hint=f"{APER_HINT} (ina.zip)"
    ),
    "cub": DatasetSpec(
        "cub",
        "image_folder",
        "cub",
        {"presplit": ("aper",), "cub": ("official",)},
        200,
        hint=f"{APER_HINT} (cub.zip), or CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158",
    ),
    "objectnet": DatasetSpec(
        "objectnet", "image_folder", "objectnet", APER_ONLY, 200, hint=f"{APER_HINT} (objnet.tgz)"
    ),
    "omnibenchmark": DatasetSpec(
        "omnibenchmark", "image_folder", "omnibenchmark", APER_ONLY, 300, hint=f"{APER_HINT} (omnibenchmark.zip)"
    ),
    "vtab": DatasetSpec("vtab", "image_folder", "vtab", APER_ONLY, 50, hint=f"{APER_HINT} (vtab.zip)"),
    "image_folder": DatasetSpec(
        "image_folder", "image_folder", None, {"presplit": ("given",)}, None, hint="Any folder with train/ and test/"
    ),
}
LAYOUT_WORDS = {
    "presplit": "train/<class>/ and test/<class>/ folders",
    "unsplit": "class folders without a train/test split",
    "cub": "the original CUB_200_2011 archive (images/ with images.txt and train_test_split.txt)",
    "cifar": "CIFAR-100's python pickles (train, test, meta)",
}


# ------------------------------------------------------------------------------------ the roots
def default_root(name: str) -> Path:
    """``dataset.root`` of ``configs/dataset/<name>.yaml`` with ``${paths.data_dir}`` resolved as
    ``configs/paths/default.yaml`` does (``$PILOT_DATA_DIR``, else ``data`` under the current folder)."""
    spec = DATASETS[name]
    if spec.config is None:
        raise SourceError(f"{name} has no default root: pass --root DIR (the folder to hold train/ and test/)")
    import yaml

    path = CONFIG_DIR / "dataset" / f"{spec.config}.yaml"
    root = str(yaml.safe_load(path.read_text(encoding="utf-8"))["dataset"]["root"])
    match = re.fullmatch(r"\$\{paths\.data_dir\}/(.+)", root)
    if match is None:
        raise SourceError(f"dataset.root in {path} is {root!r}, not ${{paths.data_dir}}/<folder>: pass --root DIR")
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT) / match.group(1)


def staging_dir(root: Path) -> Path:
    """The sibling folder a root is built in before it is renamed into place."""
    return root.parent / f".{root.name}.pilot-partial"


# ----------------------------------------------------------------------------------- the layout
@dataclass
class Plan:
    """Where each source file goes in the root, and what was left out."""

    layout: str  # presplit | unsplit | cub | cifar
    prefix: str  # folder inside the source that holds the data ("" or "a/b/")
    files: dict[str, str]  # source path -> path in the root
    ignored: list[str] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(dst.split("/", 1)[0] for dst in self.files.values())

    def classes(self) -> set[str]:
        return {dst.split("/")[1] for dst in self.files.values() if dst.count("/") == 2}


def is_junk(path: str) -> bool:
    """Files that archivers add and no dataset means: macOS resource forks and folder metadata."""
    parts = path.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in (".DS_Store", "Thumbs.db")


def find_presplit_prefix(paths: list[str]) -> str | None:
    """The shallowest folder that has both a ``train/`` and a ``test/`` subfolder holding files."""
    seen: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split("/")
        for i, part in enumerate(parts[:-1]):
            if part in ("train", "test"):
                seen.setdefault("".join(p + "/" for p in parts[:i]), set()).add(part)
    both = sorted((p for p, s in seen.items() if s == {"train", "test"}), key=lambda p: (p.count("/"), p))
    if len(both) > 1 and both[0].count("/") == both[1].count("/"):
        raise SourceError(f"the source holds several train/test folder pairs at the same depth: {both[:3]}; pass one")
    return both[0] if both else None


def plan_presplit(paths: list[str], prefix: str) -> Plan:
    """``<prefix>{train,test}/<class>/<image>`` -> ``{train,test}/<class>/<image>``; an image anywhere
    else under train/ or test/ is refused (the loader would not read it), other files are left out."""
    plan = Plan("presplit", prefix, {})
    for path in paths:
        rest = path[len(prefix) :].split("/") if path.startswith(prefix) else []
        if not rest or rest[0] not in ("train", "test") or not mf.is_image_name(path):
            plan.ignored.append(path)  # not data: the loader reads images only
        elif len(rest) == 2:
            raise SourceError(f"unexpected layout: {path} lies directly in {prefix}{rest[0]}/, not in a class folder")
        elif len(rest) > 3:
            raise SourceError(
                f"unexpected layout: {path} lies in a subfolder of class folder {prefix}{'/'.join(rest[:2])}/; "
                "the loader reads only the files directly inside each class folder"
            )
        else:
            plan.files[path] = "/".join(rest)
    train = {d.split("/")[1] for d in plan.files.values() if d.startswith("train/")}
    test = {d.split("/")[1] for d in plan.files.values() if d.startswith("test/")}
    if train != test:
        odd = sorted(train ^ test)
        where = "train/ but not test/" if odd[0] in train else "test/ but not train/"
        raise SourceError(
            f"unexpected layout: class {odd[0]!r} has images in {prefix}{where} ({len(odd)} such class(es): "
            f"{odd[:5]}); every class needs training and test images"
        )
    return plan


def plan_unsplit(paths: list[str]) -> Plan | None:
    """``<prefix><class>/<image>`` with one common prefix; None when the images do not sit that way."""
    images = [p for p in paths if mf.is_image_name(p)]
    prefixes = {"".join(q + "/" for q in p.split("/")[:-2]) for p in images if p.count("/") >= 1}
    if not images or len(prefixes) != 1 or any(p.count("/") == 0 for p in images):
        return None
    prefix = prefixes.pop()
    plan = Plan("unsplit", prefix, {p: p[len(prefix) :] for p in images})
    plan.ignored = [p for p in paths if p not in plan.files]
    return plan


def find_cub_prefix(paths: list[str]) -> str | None:
    """The folder holding CUB-200-2011's ``images.txt``, ``train_test_split.txt`` and ``images/``."""
    for path in paths:
        if path.endswith("train_test_split.txt"):
            prefix = path[: -len("train_test_split.txt")]
            if f"{prefix}images.txt" in paths:
                return prefix
    return None


def find_cifar_prefix(paths: list[str]) -> str | None:
    """The folder holding CIFAR-100's ``train``, ``test`` and ``meta`` pickles."""
    for path in paths:
        if path.endswith("meta") and path.rsplit("/", 1)[-1] == "meta":
            prefix = path[: -len("meta")]
            if {f"{prefix}train", f"{prefix}test"} <= set(paths):
                return prefix
    return None


def describe_paths(paths: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many there are when there are more."""
    return ", ".join(paths[:limit]) + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def plan_source(spec: DatasetSpec, listing: Listing) -> Plan:
    """Recognise the source's layout and map its files into the root (before any split)."""
    paths = [e.path for e in listing.entries if not is_junk(e.path)]
    junk = [e.path for e in listing.entries if is_junk(e.path)]
    if spec.layout == "cifar":
        prefix = find_cifar_prefix(paths)
        if prefix is None:
            raise SourceError(
                f"unexpected layout: no folder with CIFAR-100's train, test and meta files (torchvision's "
                f"cifar-100-python/); found {describe_paths(paths)}"
            )
        plan = Plan("cifar", prefix, {f"{prefix}{n}": f"{mf.CIFAR_FOLDER}/{n}" for n in mf.CIFAR_FILES})
        plan.ignored = [p for p in paths if p not in plan.files]
    elif (prefix := find_presplit_prefix(paths)) is not None:
        plan = plan_presplit(paths, prefix)
    elif (prefix := find_cub_prefix(paths)) is not None:
        plan = Plan("cub", prefix, {})
        plan.ignored = paths
    elif (unsplit := plan_unsplit(paths)) is not None:
        plan = unsplit
    else:
        raise SourceError(
            f"unexpected layout for {spec.name}: expected {' or '.join(LAYOUT_WORDS[k] for k in spec.splits)}; "
            f"found {describe_paths(paths) or 'no files'}"
        )
    plan.ignored += junk
    if listing.links and any(link.startswith(plan.prefix) for link in listing.links):
        raise SourceError(f"the source holds links or special files where data is expected: {listing.links[:3]}")
    return plan


# ------------------------------------------------------------------------------------ the split
def choose_split(spec: DatasetSpec, plan: Plan, requested: str | None) -> str:
    """The split to apply: ``requested`` if the source's layout allows it, else the only one it allows."""
    allowed = spec.splits.get(plan.layout)
    found = LAYOUT_WORDS[plan.layout]
    if allowed is None:
        expected = " or ".join(f"{LAYOUT_WORDS[k]} (--split {'|'.join(v)})" for k, v in spec.splits.items())
        raise SourceError(
            f"unexpected layout for {spec.name}: the source holds {found}; expected {expected}. {spec.hint}"
        )
    if requested is None:
        if len(allowed) > 1:
            raise SourceError(
                f"{spec.name}: the source holds {found}; choose the split with --split {' or --split '.join(allowed)} "
                f"({'; '.join(f'{s}: {SPLIT_RULES[s].description}' for s in allowed)})"
            )
        return allowed[0]
    if requested not in allowed:
        other = [f"--split {s} needs {LAYOUT_WORDS[k]}" for k, v in spec.splits.items() for s in v if s == requested]
        raise SourceError(
            f"--split {requested} does not apply: the source holds {found}, which allows --split "
            f"{' or '.join(allowed)}. {'; '.join(other) or f'{spec.name} has no split {requested!r}'}. {spec.hint}"
        )
    return requested


def apply_split(spec: DatasetSpec, plan: Plan, split: str, listing: Listing) -> Plan:
    """Turn an unsplit or CUB plan into train/test destinations; presplit and CIFAR plans pass through."""
    if plan.layout == "unsplit":
        n = len(plan.files)
        if spec.unsplit_images is not None and n != spec.unsplit_images:
            raise SourceError(
                f"{spec.name}: the source holds {n} images in class folders, the {split} split is defined on "
                f"{spec.unsplit_images}; a missing or extra image would change every assignment. {spec.hint}"
            )
        by_rel = {rel: src for src, rel in plan.files.items()}
        try:
            train, test = (
                splits.dualprompt_split(list(by_rel))
                if split == "dualprompt"
                else splits.file_list_split(list(by_rel), FILE_LISTS[split])
            )
        except ValueError as err:
            raise SourceError(f"{spec.name}: {err}") from err
        files = {by_rel[r]: f"train/{r}" for r in train} | {by_rel[r]: f"test/{r}" for r in test}
        return Plan(plan.layout, plan.prefix, files, plan.ignored)
    if plan.layout == "cub":
        return plan_cub(plan.prefix, [e.path for e in listing.entries], listing.texts)
    return plan


def plan_cub(prefix: str, paths: list[str], texts: dict[str, bytes]) -> Plan:
    """CUB-200-2011's ``images/<class>/<file>`` into train/test by ``train_test_split.txt``."""
    try:
        assignment = splits.cub_official_split(
            texts[f"{prefix}images.txt"].decode("utf-8"), texts[f"{prefix}train_test_split.txt"].decode("utf-8")
        )
    except (KeyError, UnicodeDecodeError, ValueError) as err:
        raise SourceError(f"CUB-200-2011's split files under {prefix or './'} cannot be read: {err}") from err
    present = set(paths)
    missing = [rel for rel in assignment if f"{prefix}images/{rel}" not in present]
    if missing:
        raise SourceError(
            f"images.txt lists {len(missing)} image(s) that the source lacks, e.g. {prefix}images/{missing[0]}"
        )
    files = {f"{prefix}images/{rel}": f"{split}/{rel}" for rel, split in assignment.items()}
    listed_dir = f"{prefix}images/"
    unlisted = [p for p in paths if p.startswith(listed_dir) and p not in files and not is_junk(p)]
    if unlisted:
        raise SourceError(f"{len(unlisted)} image file(s) under {listed_dir} are not in images.txt, e.g. {unlisted[0]}")
    ignored = [p for p in paths if p not in files]
    return Plan("cub", prefix, files, ignored)


# --------------------------------------------------------------------------------- CIFAR pickles
# The CIFAR-100 files that torchvision's CIFAR100 checks before reading (train_list, test_list and
# meta of torchvision/datasets/cifar.py).
CIFAR_MD5_SOURCE = (
    "https://github.com/pytorch/vision/blob/main/torchvision/datasets/cifar.py (train_list, test_list, meta)"
)
CIFAR_FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickles (dicts, lists, numpy arrays) and nothing that could run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-100 pickle")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if _has_module("numpy._core.multiarray") else module
        return super().find_class(module, name)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data = _ArrayUnpickler(f, encoding="latin1").load()
        except Exception as err:  # any unpickling failure means the file is not CIFAR's
            raise SourceError(f"{path.name} is not a CIFAR-100 pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise SourceError(f"{path.name} is not a CIFAR-100 pickle (holds a {type(data).__name__}, not a dict)")
    return data


def with_cifar_files(checksum: ChecksumStatus) -> ChecksumStatus:
    """The checksum status once the three CIFAR files matched torchvision's MD5s."""
    files = "train, test and meta match torchvision's md5s"
    if checksum.status == "not applicable":  # a folder source: the files are all there is to check
        return ChecksumStatus("verified", files, None, CIFAR_MD5_SOURCE)
    return ChecksumStatus(checksum.status, f"{checksum.detail}; {files}", checksum.expected_md5, checksum.published_at)


def cifar_counts(folder: Path) -> dict[str, int]:
    """Classes and images per split, read from the pickles as torchvision reads them."""
    meta = read_cifar_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise SourceError("meta has no fine_label_names: not CIFAR-100's meta file")
    counts = {"classes": len(meta["fine_label_names"])}
    for split in ("train", "test"):
        batch = read_cifar_pickle(folder / split)
        if "fine_labels" not in batch or "data" not in batch:
            raise SourceError(f"{split} has no fine_labels or data: not a CIFAR-100 batch")
        if len(batch["data"]) != len(batch["fine_labels"]):
            raise SourceError(f"{split}: {len(batch['data'])} images but {len(batch['fine_labels'])} labels")
        counts[split] = len(batch["fine_labels"])
    return counts


def check_cifar_files(folder: Path, files: dict[str, str]) -> None:
    """Refuse CIFAR files whose MD5 is not torchvision's (torchvision would refuse them later)."""
    for name in mf.CIFAR_FILES:
        md5 = mf.file_digests(folder / name, ("md5",))["md5"]
        if md5 != files[name]:
            raise SourceError(
                f"{mf.CIFAR_FOLDER}/{name}: md5 {md5} is not torchvision's {files[name]} (torchvision's CIFAR100 "
                "would refuse it as corrupted); download cifar-100-python.tar.gz again"
            )


# ------------------------------------------------------------------------------------ prepare
@dataclass
class Outcome:
    """What :func:`prepare` or :func:`verify` did, for printing and for tests."""

    root: Path
    record: dict
    lines: list[str]
    manifest_hash: str


def prepare(
    name: str,
    source: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    check_checksum: bool = True,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Prepare dataset ``name`` from ``source`` into ``root`` (see the module docstring)."""
    spec = dataset_spec(name)
    root_path = Path(root).expanduser() if root is not None else default_root(name)
    src = open_source(Path(source).expanduser())
    say(f"{name}: source {src.path} ({src.kind})")
    if (root_path / mf.PREPARED).is_file():
        return rerun(spec, src, root_path, split, check_checksum, say)
    digests, checksum = source_checksum(spec, src, check_checksum)
    say(f"  checksum: {checksum.status}: {checksum.detail}")
    listing = src.list(want_text=lambda p: p.endswith(("images.txt", "train_test_split.txt")))
    plan = plan_source(spec, listing)
    chosen = choose_split(spec, plan, split)
    plan = apply_split(spec, plan, chosen, listing)
    refuse_class_count(spec, plan)
    in_place = isinstance(src, FolderSource) and in_place_target(src, plan, root_path)
    if in_place:
        known = materialize(src, plan, root_path, in_place=True)
        record = finish(spec, src, plan, chosen, root_path, known, digests, checksum, check_checksum, True)
    else:
        record = build_and_rename(spec, src, plan, chosen, root_path, digests, checksum, check_checksum)
    lines = summary(record, root_path, plan)
    for line in lines:
        say(line)
    return Outcome(root_path, record, lines, record["manifest_hash"])


def build_and_rename(
    spec: DatasetSpec,
    src: ArchiveSource | FolderSource,
    plan: Plan,
    split: str,
    root: Path,
    digests: dict,
    checksum: ChecksumStatus,
    check_checksum: bool,
) -> dict:
    """Build the root in its staging folder, then rename it into place: a root is complete or absent."""
    refuse_occupied_root(root, src)
    build = staging_dir(root)
    remove_tree(build)  # a leftover of an interrupted run of this tool
    try:
        known = materialize(src, plan, build, in_place=False)
        record = finish(spec, src, plan, split, build, known, digests, checksum, check_checksum, False)
    except BaseException:
        remove_tree(build)
        raise
    if root.is_dir():
        root.rmdir()  # refuse_occupied_root made sure it is empty
    os.rename(build, root)
    return record


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise SourceError(f"unknown dataset {name!r}; one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def source_checksum(spec: DatasetSpec, src: ArchiveSource | FolderSource, check: bool) -> tuple[dict, ChecksumStatus]:
    """Hash an archive (MD5 and SHA-256) and compare with the published MD5."""
    if isinstance(src, FolderSource):
        status = ChecksumStatus(
            "not applicable", "a folder source has no archive checksum; file hashes go to the manifest"
        )
        return {}, status
    digests = src.digests()
    if not check:
        return digests, ChecksumStatus("skipped", f"--no-checksum (md5 {digests['md5']})")
    return digests, check_archive(spec.name, src.path, digests["md5"], KNOWN_ARCHIVES)


def refuse_class_count(spec: DatasetSpec, plan: Plan) -> None:
    if spec.num_classes is None or plan.layout == "cifar":
        return
    n = len(plan.classes())
    if n != spec.num_classes:
        raise SourceError(
            f"{spec.name} has {spec.num_classes} classes; the source holds {n} class folders. {spec.hint}"
        )


def in_place_target(src: FolderSource, plan: Plan, root: Path) -> bool:
    """A folder source is used in place when the root is the folder that already has the final layout."""
    data_dir = (src.path / plan.prefix).resolve()
    if plan.layout == "presplit":
        return data_dir == root.resolve()
    if plan.layout == "cifar":
        return data_dir == (root / mf.CIFAR_FOLDER).resolve() and data_dir.name == mf.CIFAR_FOLDER
    return False


def refuse_occupied_root(root: Path, src: ArchiveSource | FolderSource) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        hint = (
            f" If it holds the data already, pass it as the source: --source {root} --root {root}."
            if isinstance(src, ArchiveSource)
            else ""
        )
        raise SourceError(
            f"--root {root} exists and is not empty, but was not prepared by this tool (no {mf.PREPARED}): "
            f"choose an empty or new root, or remove it.{hint}"
        )


def materialize(
    src: ArchiveSource | FolderSource, plan: Plan, build: Path, in_place: bool
) -> dict[str, tuple[int, str]]:
    """Put the planned files into ``build``; returns sizes and hashes computed on the way."""
    if in_place:
        refuse_hidden_images(src.path / plan.prefix, plan)
        return {}
    build.mkdir(parents=True)
    if isinstance(src, ArchiveSource):
        return src.extract(plan.files, build)
    if plan.layout == "presplit":
        refuse_hidden_images(src.path / plan.prefix, plan)
        for split in ("train", "test"):
            os.symlink((src.path / plan.prefix / split).resolve(), build / split)
    elif plan.layout == "cifar":
        os.symlink((src.path / plan.prefix).resolve(), build / mf.CIFAR_FOLDER)
    else:
        src.link(plan.files, build)
    return {}


def refuse_hidden_images(data_dir: Path, plan: Plan) -> None:
    """Linked or in-place folders are read as they are: refuse junk files the loader would read."""
    read = mf.scan_image_folder(data_dir) if plan.layout == "presplit" else {}
    junk = sorted(p for p in read if is_junk(p))
    if junk:
        raise SourceError(
            f"{data_dir / junk[0]} looks like an image to the loader but is archiver metadata ({len(junk)} such "
            "file(s)); remove them from the source folder, or prepare from the archive"
        )


def finish(
    spec: DatasetSpec,
    src: ArchiveSource | FolderSource,
    plan: Plan,
    split: str,
    build: Path,
    known: dict[str, tuple[int, str]],
    digests: dict,
    checksum: ChecksumStatus,
    check_checksum: bool,
    in_place: bool,
) -> dict:
    """Check what was built, write the manifest and ``prepared.json``; returns the record."""
    if spec.layout == "cifar":
        if check_checksum:
            check_cifar_files(build / mf.CIFAR_FOLDER, CIFAR_FILE_MD5)
            checksum = with_cifar_files(checksum)
        counts = cifar_counts(build / mf.CIFAR_FOLDER)
    files = mf.scan_root(build, spec.layout)
    rows = mf.build_rows(build, files, known)
    if spec.layout != "cifar":
        counts = {"classes": len({r.cls for r in rows}), **Counter(r.split for r in rows)}
    digest = mf.write_manifest(build, rows)
    how = (
        "in place" if in_place else "extracted" if isinstance(src, ArchiveSource) else "linked (symlinks to the source)"
    )
    record = {
        "name": spec.name,
        "layout": spec.layout,
        "split": split,
        "split_rule": {
            "description": SPLIT_RULES[split].description,
            "source": SPLIT_RULES[split].source,
            "published_counts": SPLIT_RULES[split].published,
        },
        "source": {"path": str(src.path.resolve()), "kind": src.kind, "layout": plan.layout, **digests}
        | ({"size": src.path.stat().st_size} if isinstance(src, ArchiveSource) else {}),
        "checksum": checksum.as_dict(),
        "materialized": how,
        "counts": {"classes": counts["classes"], "train": counts.get("train", 0), "test": counts.get("test", 0)},
        "files": len(rows),
        "ignored_source_files": {"count": len(plan.ignored), "examples": sorted(plan.ignored)[:10]},
        "manifest_sha256": digest,
        "manifest_hash": digest[: mf.SHORT_HASH],
        "pilot_version": pilot.__version__,
    }
    (build / mf.PREPARED).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def summary(record: dict, root: Path, plan: Plan | None = None) -> list[str]:
    """What was found and written, as printed after ``prepare``."""
    counts, rule = record["counts"], record["split_rule"]
    found = f"  found: {counts['classes']} classes | train {counts['train']} | test {counts['test']} images"
    if plan is not None and plan.classes():
        found += f" | classes: {describe_paths(sorted(plan.classes()), 5)}"
    lines = [
        f"  split: {record['split']}: {rule['description']}",
        f"    rule from {rule['source']}; published counts: {rule['published_counts']}",
        found,
        f"  root: {root} ({record['materialized']})",
    ]
    if plan is not None and plan.ignored:
        left_out = describe_paths(sorted(plan.ignored), 3)
        lines.append(f"  left out {len(plan.ignored)} source file(s) that are not data: {left_out}")
    lines.append(f"  manifest: {record['files']} files | manifest hash {record['manifest_hash']}")
    return lines


def rerun(
    spec: DatasetSpec, src: ArchiveSource | FolderSource, root: Path, split: str | None, check: bool, say: Callable
) -> Outcome:
    """A root that was prepared before: same dataset, split and source, then verify; change nothing."""
    record = read_record(root)
    if record.get("name") != spec.name:
        raise SourceError(f"{root} was prepared for {record.get('name')!r}, not {spec.name!r}; choose another --root")
    if split is not None and split != record.get("split"):
        raise SourceError(f"{root} was prepared with --split {record.get('split')}, not {split}; choose another --root")
    recorded = record.get("source", {})
    if isinstance(src, ArchiveSource):
        digests, checksum = source_checksum(spec, src, check)
        same = digests["sha256"] == recorded.get("sha256")
        say(f"  checksum: {checksum.status}: {checksum.detail}")
    else:
        same = str(src.path.resolve()) == recorded.get("path")
    if not same:
        raise SourceError(
            f"{root} was prepared from another source ({recorded.get('path')}, sha256 "
            f"{str(recorded.get('sha256'))[:12]}); choose another --root, or remove {root} to prepare it again"
        )
    outcome = verify(spec.name, root, say=lambda line: None)
    lines = ["  already prepared from this source: verified, nothing changed", *summary(record, root)]
    for line in lines:
        say(line)
    return Outcome(root, record, lines, outcome.manifest_hash)


def read_record(root: Path) -> dict:
    try:
        return json.loads((root / mf.PREPARED).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(
            f"{root / mf.PREPARED} cannot be read ({err}); the root was not prepared by this tool"
        ) from err


# ------------------------------------------------------------------------------------- verify
def verify(name: str, root: str | os.PathLike[str] | None = None, say: Callable[[str], None] = print) -> Outcome:
    """Recheck a prepared root against its manifest; :class:`SourceError` lists every difference."""
    spec = dataset_spec(name)
    root_path = Path(root).expanduser() if root is not None else default_root(name)
    if not (root_path / mf.PREPARED).is_file():
        raise SourceError(f"{root_path} was not prepared ({mf.PREPARED} is missing): run prepare {name} --source PATH")
    record = read_record(root_path)
    if record.get("name") != name:
        raise SourceError(f"{root_path} was prepared for {record.get('name')!r}, not {name!r}")
    mismatch, rows = mf.verify_root(root_path, record.get("layout", spec.layout))
    if mismatch:
        raise SourceError("\n".join([f"{root_path} does not match its manifest:", *mismatch.lines()]))
    short = mf.manifest_hash(root_path) or ""
    say(f"{name}: {root_path}: all {len(rows)} files match the manifest | manifest hash {short}")
    return Outcome(root_path, record, [], short)
