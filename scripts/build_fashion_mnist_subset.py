"""Build the class-balanced Fashion-MNIST subset shipped in pilot/data/embedded/.

Reads the full set (Debian's dataset-fashion-mnist package by default), draws a fixed number of
images per class with a seeded permutation, and writes uint8 arrays to a compressed .npz:

    python scripts/build_fashion_mnist_subset.py --train-per-class 300 --test-per-class 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pilot.data.datasets import EMBEDDED_DIR, FASHION_MNIST_FILES, _idx_path, find_fashion_mnist, read_idx


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` samples of every class, drawn without replacement, sorted."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder with the four IDX files")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(EMBEDDED_DIR / "fashion_mnist_subset.npz"))
    args = parser.parse_args()

    folder = find_fashion_mnist([Path(args.source)])
    if folder is None:
        raise SystemExit(f"No Fashion-MNIST IDX files under {args.source} (apt-get install dataset-fashion-mnist)")
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images_file, labels_file = FASHION_MNIST_FILES[split]
        images, labels = read_idx(_idx_path(folder, images_file)), read_idx(_idx_path(folder, labels_file))
        keep = balanced_subset(labels, per_class, rng)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep].astype(np.uint8)
        arrays[f"{split}_source_index"] = keep.astype(np.int32)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
