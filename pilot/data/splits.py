"""Train/test split rules of the reference protocols, applied to a list of image paths.

Paths are ``<class>/<file>`` relative to the folder of class folders. Each rule names its source.

- DualPrompt / L2P (PyTorch ports by Jaeho Lee): :func:`dualprompt_split`.
- CODA-Prompt's fixed lists: :func:`file_list_split` with :data:`CODA_IMAGENET_R`.
- CUB-200-2011's official split: :func:`cub_official_split`.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from dataclasses import dataclass

from pilot.data import coda_split

# ------------------------------------------------------------------------------------ DualPrompt
DUALPROMPT_SEED = 42
DUALPROMPT_TRAIN_FRACTION = 0.8
DUALPROMPT_SOURCE = (
    "https://github.com/JH-LEE-KR/dualprompt-pytorch/blob/7eb457d988409a6abf97af2b121ffa62dd4b498a/"
    "continual_datasets/continual_datasets.py#L651-L663 (Imagenet_R), seed from main.py and "
    "configs/imr_dualprompt.py (--seed 42)"
)


def imagefolder_order(paths: list[str]) -> list[str]:
    """``<class>/<file>`` paths in the order of torchvision's ``ImageFolder`` on flat class folders:
    classes sorted by name, then files sorted by name within each class."""
    return sorted(paths, key=lambda p: tuple(p.split("/", 1)))


def dualprompt_split(paths: list[str], seed: int = DUALPROMPT_SEED) -> tuple[list[str], list[str]]:
    """DualPrompt's ImageNet-R split (identical in JH-LEE-KR/l2p-pytorch).

    The reference builds ``torchvision.datasets.ImageFolder`` on the unsplit ``imagenet-r/`` folder
    (200 class folders, 30,000 images), then calls
    ``torch.utils.data.random_split(dataset, [int(0.8 * n), n - int(0.8 * n)])`` right after
    ``torch.manual_seed(args.seed)`` with ``--seed 42`` and no other draw from torch's generator in
    between. ``random_split`` takes ``torch.randperm(n, generator=default_generator)`` and gives its
    first ``int(0.8 * n)`` indices to train and the rest to test: one global permutation, not per
    class, so classes do not keep exactly 80/20. For 30,000 images: 24,000 / 6,000.

    We draw the same permutation from a fresh CPU generator seeded with ``seed`` (the same
    Mersenne-Twister state as the default generator after ``torch.manual_seed(seed)``), so the
    caller's global random state is untouched. Returns ``(train, test)`` in permutation order.
    """
    import torch  # only this split needs torch

    ordered = imagefolder_order(paths)
    n_train = int(DUALPROMPT_TRAIN_FRACTION * len(ordered))
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    return [ordered[i] for i in perm[:n_train]], [ordered[i] for i in perm[n_train:]]


# ------------------------------------------------------------------------------- fixed file lists
@dataclass(frozen=True)
class FileListSplit:
    """A split given as a fixed list: which of a known, sorted set of files are test images."""

    name: str
    source: str
    num_files: int
    num_test: int
    files_sha256: str  # SHA-256 of the sorted paths joined with "\n"
    test_sha256: str  # the same for the sorted test paths
    mask: str  # base64(zlib(bits)), bit i (MSB first) set when sorted path i is a test image


def list_sha256(paths: list[str]) -> str:
    """SHA-256 of sorted ``paths`` joined with newlines (UTF-8)."""
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8")).hexdigest()


def encode_mask(files: list[str], test: set[str]) -> str:
    """The bit mask of ``test`` over sorted ``files``, zlib-compressed and base64-encoded."""
    bits = bytearray((len(files) + 7) // 8)
    for i, path in enumerate(sorted(files)):
        if path in test:
            bits[i // 8] |= 1 << (7 - i % 8)
    return base64.b64encode(zlib.compress(bytes(bits), 9)).decode("ascii")


def decode_mask(mask: str, n: int) -> list[bool]:
    """Inverse of :func:`encode_mask`: one flag per sorted file."""
    bits = zlib.decompress(base64.b64decode(mask))
    if len(bits) != (n + 7) // 8:
        raise ValueError(f"split mask holds {len(bits) * 8} bits, {n} files expected")
    return [bool(bits[i // 8] >> (7 - i % 8) & 1) for i in range(n)]


def file_list_split(paths: list[str], spec: FileListSplit) -> tuple[list[str], list[str]]:
    """Split ``paths`` as the list ``spec`` says; ``ValueError`` when the files are not the listed ones."""
    ordered = sorted(paths)
    if len(ordered) != spec.num_files or list_sha256(ordered) != spec.files_sha256:
        raise ValueError(
            f"the {len(ordered)} image files found are not the {spec.num_files} files of {spec.name}'s list "
            f"(hash of the sorted paths {list_sha256(ordered)[:12]}, the list's {spec.files_sha256[:12]}; "
            f"list: {spec.source})"
        )
    flags = decode_mask(spec.mask, spec.num_files)
    test = [p for p, is_test in zip(ordered, flags) if is_test]
    if len(test) != spec.num_test or list_sha256(test) != spec.test_sha256:
        raise ValueError(f"the stored {spec.name} split mask does not decode to its test list (damaged install?)")
    train = [p for p, is_test in zip(ordered, flags) if not is_test]
    return train, test


def file_list_split_from_coda_yaml(train_yaml: str, test_yaml: str, name: str = "CODA-Prompt") -> FileListSplit:
    """Build a :class:`FileListSplit` from CODA-Prompt's two split files (their text).

    Each file is YAML with ``data`` (paths ``data/imagenet-r/<wnid>/<file>``) and ``targets``; the
    paths are cut to ``<wnid>/<file>``. This is how :data:`CODA_IMAGENET_R` was made.
    """
    import yaml

    def relative(text: str) -> list[str]:
        return ["/".join(p.split("/")[-2:]) for p in yaml.safe_load(text)["data"]]

    train, test = relative(train_yaml), relative(test_yaml)
    files = train + test
    if len(set(files)) != len(files):
        raise ValueError("the two lists share or repeat images")
    return FileListSplit(
        name,
        "CODA-Prompt yaml",
        len(files),
        len(test),
        list_sha256(files),
        list_sha256(test),
        encode_mask(files, set(test)),
    )


CODA_IMAGENET_R = FileListSplit(
    name="CODA-Prompt",
    source=coda_split.SOURCE,
    num_files=coda_split.NUM_FILES,
    num_test=coda_split.NUM_TEST,
    files_sha256=coda_split.FILES_SHA256,
    test_sha256=coda_split.TEST_SHA256,
    mask="".join(coda_split.MASK),
)


# ----------------------------------------------------------------------------------------- CUB
CUB_SOURCE = (
    "CUB_200_2011/README and train_test_split.txt in CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158)"
)


def cub_official_split(images_txt: str, split_txt: str) -> dict[str, str]:
    """CUB-200-2011's own split: ``images.txt`` maps ``<image_id> <class>/<file>``,
    ``train_test_split.txt`` maps ``<image_id> <is_training_image>`` (1 = train, 0 = test).
    Published sizes: 5,994 training and 5,794 test images (11,788 in all).

    Returns ``{<class>/<file>: "train" | "test"}``; ``ValueError`` on ids that do not match.
    """
    paths = dict(_pairs(images_txt, "images.txt"))
    flags = dict(_pairs(split_txt, "train_test_split.txt"))
    if set(paths) != set(flags):
        only = sorted(set(paths) ^ set(flags))
        raise ValueError(f"images.txt and train_test_split.txt list different image ids, e.g. {only[0]}")
    bad = [i for i, flag in flags.items() if flag not in ("0", "1")]
    if bad:
        raise ValueError(f"train_test_split.txt: image id {bad[0]} has flag {flags[bad[0]]!r}, expected 0 or 1")
    return {paths[i]: "train" if flags[i] == "1" else "test" for i in paths}


def _pairs(text: str, name: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{name} line {number}: expected two fields, got {line!r}")
            pairs.append((fields[0], fields[1]))
    return pairs
