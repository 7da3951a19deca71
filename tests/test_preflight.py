"""Everything a run depends on is checked before any training: the split arithmetic, every class's
images, the image files themselves, a backbone checkpoint, and what the learner needs from the
backbone and the scenario. Each refusal is a PilotError whose message names the culprit."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FAST, compose_config, run_config
from PIL import Image

from pilot.api import make_learner
from pilot.backbones.factory import create_timm_backbone
from pilot.config import build
from pilot.data import datasets
from pilot.data.images import ArrayImages, ClassificationData, check_image_file
from pilot.data.scenario import make_scenario
from pilot.errors import ConfigError, DatasetError, IncompatibleBackboneError, PilotError, WeightsUnavailableError
from pilot.learners.base import Learner
from pilot.runtime import make_runtime

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3)  # configs/backbone/vit_test_tiny.yaml
NOT_SYNTHETIC = [o for o in FAST if not o.startswith("dataset=")]


@pytest.fixture(autouse=True)
def _nothing_trains(monkeypatch):
    """Any attempt to train turns into a test failure: every refusal here must come before it."""

    def fit(self, session):
        raise AssertionError(f"{type(self).__name__} started training session {session.info.index}")

    monkeypatch.setattr(Learner, "fit", fit)


def refused(overrides: list[str], tmp_path: Path, error: type[PilotError], *fragments: str) -> str:
    """Run with ``overrides``; assert it stops with ``error`` naming every fragment and wrote no results."""
    with pytest.raises(error) as caught:
        run_config(overrides, tmp_path / "run")
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not (tmp_path / "run" / "sessions.csv").exists()
    return message


# ------------------------------------------------------------------------------------ helpers
def write_folder(root: Path, layout: dict[str, dict[str, int]], size: int = 8) -> Path:
    """``root/<split>/<class>/img<i>.jpg``: ``layout[split][class]`` small random JPEGs (0 = empty folder)."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.jpg", quality=90)
    return root


def folder_run(root: Path, *extra: str) -> list[str]:
    """A SimpleCIL run on the image folder ``root`` (one class per session)."""
    return NOT_SYNTHETIC + [
        "+method=simplecil",
        "dataset=image_folder",
        f"dataset.root={root}",
        "scenario=b0inc1",
        *extra,
    ]


GOOD = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}


def save_vit(path: Path, **changes) -> Path:
    """The state dict of a tiny timm ViT (the test backbone's architecture with ``changes``), with a head."""
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**TINY_VIT, **changes}).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {
        "depth4": save_vit(folder / "vit_depth4.pth", depth=4),
        "depth8": save_vit(folder / "vit_depth8.pth", depth=8),
        "wide": save_vit(folder / "vit_wide.pth", embed_dim=64, num_heads=4),
        "resnet": folder / "resnet18.pth",
        "truncated": folder / "truncated.pth",
        "text": folder / "notes.pth",
    }
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), files["resnet"])
    whole = save_vit(folder / "whole.pth").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["text"].write_text("these are not weights\n")
    return files


def ckpt_run(path: Path, *extra: str) -> list[str]:
    """A SimpleCIL run on the tiny test ViT with its weights from ``path``."""
    return FAST + ["+method=simplecil", f"backbone.checkpoint={path}", *extra]


# ---------------------------------------------------------------------------- scenario arithmetic
@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["scenario.init_cls=11"], ["scenario.init_cls=11 exceeds the 10 classes", "init_cls <= 10"]),
        (
            ["scenario.class_order=[0,0,1,2,3,4,5,6,7,8]"],
            ["exactly once", "listed more than once: [0]", "missing: [9]"],
        ),
        (["scenario.class_order=[0,1,2,3,4,5,6,7,8,10]"], ["outside 0..9: [10]", "missing: [9]"]),
        (["scenario.class_order=[0,1,2,3,4]"], ["got 5 ids", "missing: [5, 6, 7, 8, 9]"]),
    ],
    ids=["init-too-large", "duplicate-ids", "out-of-range", "missing-ids"],
)
def test_scenario_that_does_not_fit_the_dataset_is_refused(tmp_path, overrides, fragments):
    refused(FAST + ["+method=simplecil", *overrides], tmp_path, ConfigError, *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        ((10, 0, 2), ["scenario.init_cls=0", ">= 1", "B0Inc2 means", "scenario.init_cls=2"]),
        ((10, 2, -3), ["scenario.increment=-3", ">= 1"]),
        ((10, 2, 2, "random"), ["scenario.class_order='random'", "'shuffle', 'natural'"]),
        ((3, 1, 1, [0, 1, "two"]), ["scenario.class_order[2]='two' is not a class id"]),
    ],
    ids=["init-zero", "increment-negative", "order-word", "order-not-ints"],
)
def test_scenario_values_are_refused_when_built(args, fragments):
    # On the command line the typed config check answers these first; the scenario refuses them too.
    with pytest.raises(ConfigError) as caught:
        make_scenario(*args)
    assert all(f in str(caught.value) for f in fragments), str(caught.value)


def test_increment_larger_than_the_remainder_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        scenario = make_scenario(10, 4, 8)
    assert scenario.sizes == (4, 6)  # the reference protocol: one session with the remainder
    assert "scenario.increment=8 is larger than the 6 classes left after init_cls=4" in caplog.text


# ------------------------------------------------------------------ every class has train and test
def test_empty_test_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 0}})
    refused(folder_run(root), tmp_path, DatasetError, f"Class folder {root / 'test' / 'dog'} holds no images")


def test_class_without_test_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1}})
    refused(folder_run(root), tmp_path, DatasetError, "Class 'dog'", f"no test folder {root / 'test' / 'dog'}")


def test_test_class_never_trained_is_named(tmp_path):
    root = write_folder(tmp_path / "data", {"train": {"cat": 2}, "test": {"cat": 1, "emu": 1}})
    refused(folder_run(root), tmp_path, DatasetError, "missing from train/: ['emu']", str(root / "train" / "emu"))


def test_synthetic_without_test_images_is_refused(tmp_path):
    refused(FAST + ["+method=simplecil", "dataset.test_per_class=0"], tmp_path, ConfigError, "dataset.test_per_class=0")


def test_in_memory_class_without_test_images_is_named():
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    train, test = ArrayImages(images, np.array([0, 0, 1, 1, 2, 2])), ArrayImages(images, np.array([0, 0, 0, 2, 2, 2]))
    with pytest.raises(DatasetError, match=r"Dataset toy: 'bee' \(label 1\) has no test images"):
        ClassificationData("toy", ["ant", "bee", "cow"], train, test)
    with pytest.raises(DatasetError, match=r"test labels \[7\] are outside 0..2"):
        ClassificationData("toy", ["ant", "bee", "cow"], train, ArrayImages(images, np.array([0, 1, 2, 7, 0, 1])))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_class_without_test_images_is_named(tmp_path):
    labels = {"train": np.arange(20) % 10, "test": np.array([0, 2, 3, 4, 5, 6, 7, 8, 9, 0])}  # no Trouser (1)
    for split, (images_file, labels_file) in datasets.FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / f"{images_file}.gz", np.zeros((len(labels[split]), 28, 28)))
        _write_idx(tmp_path / f"{labels_file}.gz", labels[split])
    with pytest.raises(DatasetError, match=r"'Trouser' \(label 1\) has no test images"):
        datasets.fashion_mnist(str(tmp_path), variant="full", system_root=str(tmp_path / "none"))


def test_cifar100_class_without_training_images_is_named(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCifar:  # what torchvision's CIFAR100 exposes, with class 'bee' absent from train
        base_folder = "cifar-100-python"

        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.classes = ["ant", "bee", "cow"]
            self.targets = [0, 2, 0, 2] if train else [0, 1, 2, 1]
            self.data = np.zeros((4, 32, 32, 3), dtype=np.uint8)

    (tmp_path / FakeCifar.base_folder).mkdir()
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCifar)
    with pytest.raises(DatasetError, match=r"Dataset cifar100: 'bee' \(label 1\) has no train images"):
        datasets.cifar100(str(tmp_path), download=False)


# ------------------------------------------------------------------------------ image files decode
def test_truncated_jpeg_is_named(tmp_path):
    root = write_folder(tmp_path / "data", GOOD, size=32)
    broken = root / "train" / "dog" / "img2.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    refused(
        folder_run(root),
        tmp_path,
        DatasetError,
        "1 of 10 image files cannot be read",
        f"{broken}: OSError",
        "truncated",
    )


def test_text_file_named_jpg_is_named(tmp_path):
    root = write_folder(tmp_path / "data", GOOD)
    fake = root / "test" / "cat" / "img1.jpg"
    fake.write_text("<html>404 Not Found</html>")
    refused(folder_run(root), tmp_path, DatasetError, f"{fake}: not an image file that PIL can identify")


def test_empty_image_file_is_named(tmp_path):
    root = write_folder(tmp_path / "data", GOOD)
    empty = root / "train" / "cat" / "img0.jpg"
    empty.write_bytes(b"")
    refused(folder_run(root), tmp_path, DatasetError, f"{empty}: the file is empty")


def test_full_check_decodes_what_the_fast_check_only_samples(tmp_path):
    root = write_folder(tmp_path / "data", GOOD)
    damaged = root / "train" / "cat" / "img1.png"  # signature and IEND intact, compressed pixels damaged
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(damaged)
    data = bytearray(damaged.read_bytes())
    start = data.index(b"IDAT") + 6
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    damaged.write_bytes(bytes(data))
    assert check_image_file(damaged) is None  # the cheap check of every file cannot see it...
    assert "broken data stream" in check_image_file(damaged, decode=True)  # ...a decode can
    refused(folder_run(root, "dataset.verify_images=full"), tmp_path, DatasetError, f"{damaged}: OSError")


def test_verify_images_off_skips_the_check_and_bad_values_are_refused(tmp_path):
    root = write_folder(tmp_path / "data", GOOD)
    (root / "test" / "dog" / "img0.jpg").write_text("not an image")
    data = build(compose_config(folder_run(root, "dataset.verify_images=off"), tmp_path).dataset)
    assert data.num_classes == 2  # loaded: the file would fail only when its session comes
    refused(folder_run(root, "dataset.verify_images=sometimes"), tmp_path, ConfigError, "dataset.verify_images")


# ------------------------------------------------------------------------------ checkpoint files
def test_missing_checkpoint_path(tmp_path):
    path = tmp_path / "nowhere" / "vit.safetensors"
    refused(ckpt_run(path), tmp_path, WeightsUnavailableError, f"backbone.checkpoint={path} does not exist")


def test_checkpoint_path_that_is_a_directory(tmp_path):
    refused(ckpt_run(tmp_path), tmp_path, WeightsUnavailableError, f"backbone.checkpoint={tmp_path} is a directory")


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_checkpoint_is_named(tmp_path, checkpoints, kind):
    path = checkpoints[kind]
    refused(
        ckpt_run(path), tmp_path, WeightsUnavailableError, f"backbone.checkpoint={path} cannot be read", "truncated"
    )


def test_truncated_safetensors_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    refused(ckpt_run(path), tmp_path, WeightsUnavailableError, f"backbone.checkpoint={path} cannot be read")


def test_checkpoint_with_fewer_blocks_is_refused_with_counts(tmp_path, checkpoints):
    path = checkpoints["depth4"]
    refused(
        ckpt_run(path),
        tmp_path,
        WeightsUnavailableError,
        str(path),
        "24 of the model's 78 weights are missing from the file",
        "blocks.4.",
        "backbone.strict=false",
    )


def test_checkpoint_with_extra_blocks_is_refused_with_counts(tmp_path, checkpoints):
    path = checkpoints["depth8"]
    refused(ckpt_run(path), tmp_path, WeightsUnavailableError, "24 weights of the file have no place", "blocks.6.")


def test_checkpoint_of_another_width_is_refused_even_without_strict(tmp_path, checkpoints):
    refused(
        ckpt_run(checkpoints["wide"], "backbone.strict=false"),
        tmp_path,
        WeightsUnavailableError,
        "weights have another shape",
        "(1, 1, 64) in the file, (1, 1, 48) in the model",
    )


def test_checkpoint_of_another_architecture_loads_nothing_and_is_refused(tmp_path, checkpoints):
    refused(
        ckpt_run(checkpoints["resnet"], "backbone.strict=false"),
        tmp_path,
        WeightsUnavailableError,
        "none of its 122 weights has a place in the model",
        "conv1.weight",
    )


def test_strict_false_loads_a_partial_checkpoint_and_warns(tmp_path, checkpoints, caplog):
    cfg = compose_config(
        FAST + ["+method=simplecil", f"backbone.checkpoint={checkpoints['depth4']}", "backbone.strict=false"]
    )
    with caplog.at_level(logging.WARNING):
        backbone = build(cfg.backbone)
    assert "backbone.strict=false" in caplog.text and "24 of the model's 78 weights are missing" in caplog.text
    saved = torch.load(checkpoints["depth4"], weights_only=True)
    torch.testing.assert_close(backbone.model.blocks[3].mlp.fc1.weight, saved["blocks.3.mlp.fc1.weight"])


def test_a_matching_checkpoint_loads_strictly(checkpoints, tmp_path):
    path = save_vit(tmp_path / "same.pth")  # same architecture, with a 10-way head that the backbone drops
    backbone = create_timm_backbone("vit_tiny_patch16_224", checkpoint=str(path), input_size=32, model_kwargs=TINY_VIT)
    torch.testing.assert_close(backbone.model.blocks[5].attn.qkv.bias, torch.load(path)["blocks.5.attn.qkv.bias"])


# ------------------------------------------------------------------ learner vs backbone and scenario
@pytest.mark.parametrize(
    "overrides, error, fragments",
    [
        (
            ["+method=dualprompt", "method.pool_size=4"],
            ConfigError,
            ["method.pool_size=4", "sessions, but scenario B0Inc2 has 5", ">= 5", "method.task_forced_prompt=false"],
        ),
        (["+method=l2p", "method.pool_size=5", "method.top_k=6"], ConfigError, ["method.top_k=6", "pool_size=5"]),
        (["+method=coda", "method.pool_size=3"], ConfigError, ["method.pool_size=3", "5 sessions", ">= 5"]),
        (
            ["+method=coda", "method.prompt_layers=[0,7]"],
            IncompatibleBackboneError,
            ["method.prompt_layers=[0, 7] names block(s) [7]", "6 transformer blocks (0..5)"],
        ),
        (
            ["+method=dualprompt", "method.e_prompt_layers=[2,2,3]"],
            ConfigError,
            ["method.e_prompt_layers=[2, 2, 3] lists block(s) [2] more than once"],
        ),
        (
            ["+method=ease", "backbone=efficientnet_lite0", "backbone.pretrained=false"],
            IncompatibleBackboneError,
            ["EASE works on a timm VisionTransformer", "EfficientNet"],
        ),
    ],
    ids=["dualprompt-pool", "l2p-top-k", "coda-pool", "coda-layers", "dual-repeated", "ease-cnn"],
)
def test_learner_refuses_what_it_cannot_run(tmp_path, overrides, error, fragments):
    refused(FAST + overrides, tmp_path, error, *fragments)


@pytest.fixture(scope="module")
def tiny_backbone():
    return create_timm_backbone("vit_tiny_patch16_224", pretrained=False, input_size=32, model_kwargs=TINY_VIT)


def adam(params):
    return torch.optim.Adam(params)


def test_learners_built_in_code_are_checked_before_they_allocate(tiny_backbone):

    runtime, scenario = make_runtime(device="cpu"), make_scenario(10, 2, 2)
    with pytest.raises(ConfigError, match="method.prompt_length=5 must be even"):
        make_learner("coda", tiny_backbone, scenario, runtime, optimizer=adam, scheduler=None, prompt_length=5)
    with pytest.raises(ConfigError, match="method.top_k=3 must be between 1 and method.pool_size=2"):
        make_learner("l2p", tiny_backbone, scenario, runtime, optimizer=adam, pool_size=2, top_k=3)


def test_dualprompt_short_pool_without_task_forced_prompts_is_accepted(tiny_backbone):

    learner = make_learner(
        "dualprompt",
        tiny_backbone,
        make_scenario(10, 2, 2),
        make_runtime(device="cpu"),
        optimizer=adam,
        pool_size=4,
        task_forced_prompt=False,
    )
    assert learner.e_pool.pool_size == 4  # prompts are chosen by key matching in every session
