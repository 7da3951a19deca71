"""Where a dataset comes from: published archive checksums, and reading an archive or a folder.

A *source* is an archive (tar in any compression, or zip) or an already extracted folder. Both
are read the same way: :meth:`list` returns the regular files (relative ``/``-separated paths and
sizes) and the contents of a few small text files the split needs; :meth:`ArchiveSource.extract`
writes chosen members straight to their final place, hashing them on the way.

``KNOWN_ARCHIVES`` lists every archive checksum we found published, each with the page that
publishes it. An archive whose file name (or MD5) is not listed is used without a checksum check,
and the output says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from pilot.errors import DatasetError

CHUNK = 1 << 20


class SourceError(DatasetError):
    """A source that cannot be used: wrong checksum, unreadable archive, unexpected layout."""


@dataclass(frozen=True)
class KnownArchive:
    """An archive whose checksum is published, with where it is published."""

    dataset: str
    filename: str
    md5: str
    published_at: str
    what: str


PYTORCH_OOD = "https://github.com/kkirchheim/pytorch-ood/blob/main/src/pytorch_ood/dataset/img/imagenet.py"
# Every checksum below was read from the page named beside it; none was computed by us (the
# archives could not be downloaded where this was written).
KNOWN_ARCHIVES: tuple[KnownArchive, ...] = (
    # torchvision's CIFAR100.tgz_md5 (torchvision/datasets/cifar.py), the archive of
    # https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz
    KnownArchive(
        "cifar100",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "https://github.com/pytorch/vision/blob/main/torchvision/datasets/cifar.py (CIFAR100.tgz_md5)",
        "CIFAR-100, python version (Krizhevsky)",
    ),
    # The authors' archive https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (30,000 images,
    # no split). The MD5 is recorded by pytorch-ood; TFDS records its SHA-256
    # 18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52 and size 2,191,079,936 bytes
    # (tensorflow_datasets/datasets/imagenet_r/checksums.tsv).
    KnownArchive(
        "imagenet_r",
        "imagenet-r.tar",
        "a61312130a589d0ca1a8fca1f2bd3337",
        PYTORCH_OOD + " (ImageNetR.tgz_md5)",
        "ImageNet-R, original archive of Hendrycks et al. (no train/test split)",
    ),
    # The authors' archive https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar (7,500 images,
    # no split). MD5 recorded by pytorch-ood; TFDS records SHA-256
    # 3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e, 687,552,512 bytes.
    KnownArchive(
        "imagenet_a",
        "imagenet-a.tar",
        "c3e55429088dc681f30d81f4726b6595",
        PYTORCH_OOD + " (ImageNetA.tgz_md5)",
        "ImageNet-A, original archive of Hendrycks et al. (no train/test split)",
    ),
    # CUB-200-2011 (https://data.caltech.edu/records/65de6-vp158, formerly
    # http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz); MD5 recorded by
    # Avalanche's CUB200 dataset (avalanche/benchmarks/datasets/cub200/cub200.py, tgz_md5).
    KnownArchive(
        "cub",
        "CUB_200_2011.tgz",
        "97eceeb196236b17998738112f37df78",
        "https://github.com/ContinualAI/avalanche/blob/master/avalanche/benchmarks/datasets/cub200/cub200.py (tgz_md5)",
        "CUB-200-2011, original archive (official train_test_split.txt inside)",
    ),
    # The APER/RevisitingCIL authors' pre-split archives (download links in the RevisitingCIL README);
    # MD5s posted by the first author, Da-Wei Zhou, on 2023-09-17 in
    # https://github.com/LAMDA-CL/RevisitingCIL/issues/5 (also linked from that README).
    *(
        KnownArchive(
            dataset,
            filename,
            md5,
            "https://github.com/LAMDA-CL/RevisitingCIL/issues/5 (md5sum list by the APER authors)",
            f"{label}, the APER/RevisitingCIL train/test split",
        )
        for dataset, filename, md5, label in (
            ("cub", "cub.zip", "85e342a2d5f941e740193602057df7a5", "CUB-200"),
            ("imagenet_r", "imagenet-r.zip", "730aa3fb9c7d2ec0b6381c6b23040681", "ImageNet-R"),
            ("imagenet_a", "ina.zip", "7f4aaf0b1532b7a0bd670822c152d3c5", "ImageNet-A"),
            ("omnibenchmark", "omnibenchmark.zip", "f1c30808a707f9197c6c811ea52e5cbb", "OmniBenchmark"),
            ("vtab", "vtab.zip", "a9c37bde6105a2516c900b0c33a437c1", "VTAB"),
            ("objectnet", "objnet.tgz", "63ff7443a47bd682016a8ec59b8cc1bc", "ObjectNet"),
        )
    ),
)


@dataclass(frozen=True)
class ChecksumStatus:
    """The outcome of the archive checksum check, as recorded in ``prepared.json``."""

    status: str  # verified | not published | skipped | not applicable
    detail: str
    expected_md5: str | None = None
    published_at: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "status": self.status,
            "detail": self.detail,
            "expected_md5": self.expected_md5,
            "published_at": self.published_at,
        }


def check_archive(dataset: str, path: Path, md5: str, known: tuple[KnownArchive, ...]) -> ChecksumStatus:
    """Compare an archive's MD5 with the published ones.

    An archive named like a known one must have its MD5; an archive with another name is accepted
    when its MD5 is a known one of the dataset (a renamed download), refused when it is the known
    archive of another dataset, and otherwise used unchecked (``not published``).
    """
    by_md5 = {k.md5: k for k in known}
    match = by_md5.get(md5)
    if match is not None and match.dataset == dataset:
        return ChecksumStatus("verified", f"md5 {md5} = {match.what}", match.md5, match.published_at)
    if match is not None:
        raise SourceError(
            f"{path} is {match.filename} ({match.what}; md5 {md5}), the archive of dataset {match.dataset!r}, "
            f"not of {dataset!r}. Run `python -m pilot.data prepare {match.dataset} --source {path}` or pass "
            f"the archive of {dataset}."
        )
    named = [k for k in known if k.dataset == dataset and k.filename == path.name]
    if named:
        k = named[0]
        raise SourceError(
            f"{path}: md5 {md5} does not match the published md5 {k.md5} of {k.filename} ({k.what}; "
            f"published at {k.published_at}). The file is damaged or incomplete, or a different file: "
            "download it again (or pass --no-checksum if you rebuilt the archive yourself)."
        )
    names = ", ".join(k.filename for k in known if k.dataset == dataset) or "none"
    return ChecksumStatus(
        "not published",
        f"no published checksum for {path.name} (known archives of {dataset}: {names}); not verified",
    )


# ----------------------------------------------------------------------------------------- paths
def clean_member_path(name: str) -> str:
    """A member name as a relative ``/``-separated path; refuses absolute paths and ``..``."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]
    if parts and parts[0] == "/":
        parts = parts[1:]
    if any(p == ".." for p in parts) or not parts:
        raise SourceError(f"archive member {name!r} has an unsafe path (empty, absolute or with '..'); refusing")
    return "/".join(parts)


@dataclass(frozen=True)
class Entry:
    """A regular file of a source."""

    path: str  # relative to the archive top or the source folder, "/"-separated
    size: int


@dataclass
class Listing:
    """What :meth:`ArchiveSource.list` / :meth:`FolderSource.list` found."""

    entries: list[Entry]
    texts: dict[str, bytes]  # contents of the small files the caller asked for
    links: list[str]  # members that are links or devices (never extracted)


def copy_hashing(src: IO[bytes], dst: Path) -> tuple[int, str]:
    """Copy a stream into a new file, returning its size and SHA-256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(dst, "xb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# -------------------------------------------------------------------------------------- archives
class ArchiveSource:
    """A tar (plain, gz, bz2, xz) or zip archive."""

    kind = "archive"

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
            self.format = "zip"
        elif tarfile.is_tarfile(path):
            self.format = "tar"
        elif zipfile.is_zipfile(path):
            self.format = "zip"
        else:
            raise SourceError(
                f"{path} is neither a tar archive (.tar, .tar.gz, .tgz) nor a zip archive, nor a folder; "
                "pass the downloaded archive or the folder it was extracted to."
            )

    def digests(self) -> dict[str, str]:
        """MD5 (the published checksums) and SHA-256 (recorded in prepared.json), in one read."""
        hashers = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                for h in hashers.values():
                    h.update(chunk)
        return {name: h.hexdigest() for name, h in hashers.items()}

    def list(self, want_text: Callable[[str], bool] = lambda p: False) -> Listing:
        """All regular files; the content of those for which ``want_text(path)`` is true."""
        try:
            return self._list_zip(want_text) if self.format == "zip" else self._list_tar(want_text)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise SourceError(f"{self.path} cannot be read ({type(err).__name__}: {err}); download it again") from err

    def _list_tar(self, want_text: Callable[[str], bool]) -> Listing:
        listing = Listing([], {}, [])
        with tarfile.open(self.path, "r:*") as tar:
            for m in tar:  # one sequential pass; wanted texts are read while the stream is there
                if m.isdir():
                    continue
                path = clean_member_path(m.name)
                if not m.isfile():
                    listing.links.append(path)
                    continue
                listing.entries.append(Entry(path, m.size))
                if want_text(path):
                    listing.texts[path] = tar.extractfile(m).read()  # type: ignore[union-attr]
        return listing

    def _list_zip(self, want_text: Callable[[str], bool]) -> Listing:
        listing = Listing([], {}, [])
        with zipfile.ZipFile(self.path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                path = clean_member_path(info.filename)
                listing.entries.append(Entry(path, info.file_size))
                if want_text(path):
                    listing.texts[path] = zf.read(info)
        return listing

    def extract(self, plan: dict[str, str], dest: Path) -> dict[str, tuple[int, str]]:
        """Write each member ``src`` of ``plan`` to ``dest / plan[src]``; returns ``{dst: (size, sha256)}``."""
        done: dict[str, tuple[int, str]] = {}
        try:
            if self.format == "zip":
                with zipfile.ZipFile(self.path) as zf:
                    for info in zf.infolist():
                        dst = plan.get(clean_member_path(info.filename)) if not info.is_dir() else None
                        if dst is not None:
                            self._refuse_repeat(info.filename, dst, done)
                            with zf.open(info) as src:
                                done[dst] = copy_hashing(src, dest / dst)
            else:
                with tarfile.open(self.path, "r:*") as tar:
                    for m in tar:
                        dst = plan.get(clean_member_path(m.name)) if m.isfile() else None
                        if dst is not None:
                            self._refuse_repeat(m.name, dst, done)
                            member = tar.extractfile(m)
                            if member is None:  # not a regular file (the plan only names files)
                                raise SourceError(f"{self.path}: {m.name} is not a regular file")
                            done[dst] = copy_hashing(member, dest / dst)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
            raise SourceError(
                f"{self.path} cannot be extracted ({type(err).__name__}: {err}); download it again"
            ) from err
        missing = sorted(set(plan.values()) - set(done))
        if missing:
            raise SourceError(
                f"{self.path}: {len(missing)} planned file(s) were not found on extraction, e.g. {missing[0]}"
            )
        return done

    def _refuse_repeat(self, member: str, dst: str, done: dict[str, tuple[int, str]]) -> None:
        if dst in done:
            raise SourceError(f"{self.path} holds {member} more than once; which copy is meant is unclear")


# --------------------------------------------------------------------------------------- folders
class FolderSource:
    """An already extracted folder; its files are linked or used in place, never copied."""

    kind = "folder"

    def __init__(self, path: Path) -> None:
        self.path = path

    def list(self, want_text: Callable[[str], bool] = lambda p: False) -> Listing:
        listing = Listing([], {}, [])
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.path).as_posix()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                path = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not full.is_file():
                    listing.links.append(path)  # a dangling link or a device
                    continue
                listing.entries.append(Entry(path, full.stat().st_size))
                if want_text(path):
                    listing.texts[path] = full.read_bytes()
        return listing

    def link(self, plan: dict[str, str], dest: Path) -> None:
        """Symlink ``dest / plan[src]`` to each source file ``src`` (absolute link targets)."""
        for src, dst in plan.items():
            target = dest / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((self.path / src).resolve(), target)


def open_source(path: Path) -> ArchiveSource | FolderSource:
    """The source at ``path``: a folder or an archive."""
    if not path.exists():
        raise SourceError(f"--source {path} does not exist")
    return FolderSource(path) if path.is_dir() else ArchiveSource(path)


def remove_tree(path: Path) -> None:
    """Remove a folder this tool created (links inside are removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
