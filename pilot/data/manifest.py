"""The manifest of a prepared dataset root: one row per data file, with its size and SHA-256.

``pilot.data prepare`` writes three files into a dataset root:

- ``manifest.csv``: ``path,class,split,size,sha256``, one row per file the loader reads, sorted by
  path (paths relative to the root, ``/``-separated);
- ``manifest.sha256``: the SHA-256 of ``manifest.csv`` in ``sha256sum`` format, so that
  ``sha256sum -c manifest.sha256`` checks it; its first 12 hex digits are the *manifest hash* that
  identifies the data a run used (:func:`manifest_hash`);
- ``prepared.json``: what was prepared, from which source, with which split (written by
  :mod:`pilot.data.prepare`).

Which files belong to a root is decided by :func:`scan_root`, which lists exactly what the dataset
factories of :mod:`pilot.data.datasets` read, so that ``--verify`` reports every change that alters
the data a run sees, and nothing else. Only the standard library is imported here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

MANIFEST = "manifest.csv"
MANIFEST_SHA256 = "manifest.sha256"
PREPARED = "prepared.json"
COLUMNS = ("path", "class", "split", "size", "sha256")
SHORT_HASH = 12
CIFAR_FOLDER = "cifar-100-python"  # torchvision's CIFAR100.base_folder
CIFAR_FILES = ("train", "test", "meta")  # the three files torchvision's CIFAR100 reads
# torchvision.datasets.folder.IMG_EXTENSIONS, repeated so that this module imports no torch; a test
# checks that the two agree.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Row:
    """One data file of a prepared root."""

    path: str  # relative to the root, "/"-separated
    cls: str  # class folder name; "" for files that are not per class (CIFAR's pickles)
    split: str  # train | test | meta
    size: int
    sha256: str


@dataclass
class Mismatch:
    """What ``--verify`` found different between a root and its manifest."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # manifest-level problems (edited manifest, ...)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed or self.problems)

    def lines(self, limit: int = 20) -> list[str]:
        """Human-readable report, at most ``limit`` paths per kind."""
        out = list(self.problems)
        for kind, paths in (("missing", self.missing), ("extra", self.extra), ("changed", self.changed)):
            if paths:
                out.append(f"{len(paths)} {kind} file(s):")
                out += [f"  {kind}: {p}" for p in paths[:limit]]
                if len(paths) > limit:
                    out.append(f"  ... and {len(paths) - limit} more")
        return out


# ------------------------------------------------------------------------------------ hashing
def file_digests(path: Path, algorithms: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of one file for each algorithm, reading it once."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def sha256_file(path: Path) -> str:
    return file_digests(path)["sha256"]


# ------------------------------------------------------------------------------------ scanning
def is_image_name(name: str) -> bool:
    """True when the loader reads a file of this name (torchvision's extension rule, any case)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: Path) -> dict[str, tuple[str, str]]:
    """``{relative path: (class, split)}`` of the files :func:`pilot.data.datasets.image_folder`
    reads: image files directly inside ``root/{train,test}/<class>/`` (links followed)."""
    found: dict[str, tuple[str, str]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_entry in os.scandir(split_dir):
            if not class_entry.is_dir():
                continue
            for f in os.scandir(class_entry.path):
                if f.is_file() and is_image_name(f.name):
                    found[f"{split}/{class_entry.name}/{f.name}"] = (class_entry.name, split)
    return found


def scan_cifar(root: Path) -> dict[str, tuple[str, str]]:
    """``{relative path: ("", split)}`` of the files in ``root/cifar-100-python/`` (torchvision reads
    ``train``, ``test`` and ``meta``; any other file there is listed as ``other``)."""
    folder = root / CIFAR_FOLDER
    if not folder.is_dir():
        return {}
    found = {}
    for f in os.scandir(folder):
        if f.is_file():
            found[f"{CIFAR_FOLDER}/{f.name}"] = ("", f.name if f.name in CIFAR_FILES else "other")
    return found


LAYOUTS: dict[str, Callable[[Path], dict[str, tuple[str, str]]]] = {
    "image_folder": scan_image_folder,
    "cifar": scan_cifar,
}


def scan_root(root: Path, layout: str) -> dict[str, tuple[str, str]]:
    """The data files of ``root`` for ``layout`` (``image_folder`` or ``cifar``)."""
    return LAYOUTS[layout](root)


def build_rows(root: Path, files: dict[str, tuple[str, str]], known: dict[str, tuple[int, str]]) -> list[Row]:
    """Manifest rows for ``files``; ``known`` holds ``(size, sha256)`` already computed while
    extracting (used when the size on disk agrees), everything else is hashed now."""
    rows = []
    for rel in sorted(files):
        cls, split = files[rel]
        size = (root / rel).stat().st_size
        if rel in known and known[rel][0] == size:
            digest = known[rel][1]
        else:
            digest = sha256_file(root / rel)
        rows.append(Row(rel, cls, split, size, digest))
    return rows


# ------------------------------------------------------------------------------ manifest files
def manifest_text(rows: list[Row]) -> str:
    """The CSV text of a manifest (header, then rows sorted by path, ``\\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: r.path):
        writer.writerow((r.path, r.cls, r.split, r.size, r.sha256))
    return buf.getvalue()


def write_manifest(root: Path, rows: list[Row]) -> str:
    """Write ``manifest.csv`` and ``manifest.sha256`` into ``root``; returns the manifest's SHA-256."""
    data = manifest_text(rows).encode("utf-8")
    (root / MANIFEST).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / MANIFEST_SHA256).write_text(f"{digest}  {MANIFEST}\n", encoding="utf-8")
    return digest


def read_manifest(root: Path) -> list[Row]:
    """The rows of ``root/manifest.csv``."""
    with open(root / MANIFEST, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{root / MANIFEST} does not start with the header {','.join(COLUMNS)}")
        return [Row(p, c, s, int(n), h) for p, c, s, n, h in reader]


def recorded_sha256(root: Path) -> str | None:
    """The full SHA-256 recorded in ``root/manifest.sha256`` (None when absent or malformed)."""
    path = root / MANIFEST_SHA256
    if not path.is_file():
        return None
    fields = path.read_text(encoding="utf-8").split()
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0]):
        return None
    return fields[0]


def manifest_hash(root: str | os.PathLike[str]) -> str | None:
    """The short manifest hash of a prepared dataset root (first 12 hex digits of the SHA-256 of its
    ``manifest.csv``, read from ``manifest.sha256``), or None when the root was not prepared.

    Cheap (reads one small file), so that every run can record which data it used.
    """
    digest = recorded_sha256(Path(root).expanduser())
    return digest[:SHORT_HASH] if digest else None


# --------------------------------------------------------------------------------------- verify
def verify_root(root: Path, layout: str) -> tuple[Mismatch, list[Row]]:
    """Recheck ``root`` against its manifest: every listed file present with the same size and
    SHA-256, no data file that the manifest does not list, and the manifest itself unchanged."""
    mismatch = Mismatch()
    if not (root / MANIFEST).is_file():
        mismatch.problems.append(f"{root / MANIFEST} does not exist: the root was not prepared")
        return mismatch, []
    data = (root / MANIFEST).read_bytes()
    recorded = recorded_sha256(root)
    actual = hashlib.sha256(data).hexdigest()
    if recorded is None:
        mismatch.problems.append(f"{root / MANIFEST_SHA256} is missing or malformed")
    elif recorded != actual:
        mismatch.problems.append(
            f"{MANIFEST} was changed after it was written: its SHA-256 is {actual[:SHORT_HASH]}, "
            f"{MANIFEST_SHA256} records {recorded[:SHORT_HASH]}"
        )
    rows = read_manifest(root)
    on_disk = scan_root(root, layout)
    listed = {r.path: r for r in rows}
    mismatch.missing = sorted(p for p in listed if p not in on_disk)
    mismatch.extra = sorted(p for p in on_disk if p not in listed)
    for path in sorted(set(listed) & set(on_disk)):
        row, file = listed[path], root / path
        if file.stat().st_size != row.size or sha256_file(file) != row.sha256:
            mismatch.changed.append(path)
    return mismatch, rows
