"""A small dataset in CIFAR-10's python format, cut from the two photos scikit-learn ships.

Smoke runs and the stress grid need a real upstream data pipeline without a download:
``DEST/cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` hold 32x32 RGB crops of
natural images (at 1x, 2x and 4x zoom-out, randomly flipped) with dummy labels, laid out as
the real CIFAR-10 is (https://www.cs.toronto.edu/~kriz/cifar.html), so VDVAE's own loader
reads it unchanged. VDVAE holds out 5000 training images for validation, so ``n_train``
must be larger than that for VDVAE; NVAE and Efficient-VDVAE validate on the test batch and take any size.
:func:`read` loads the format back (the CPU stand-in for torchvision's CIFAR10 uses it).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["VALIDATION_HOLDOUT", "make", "crops", "read", "missing", "FOLDER", "CIFAR_SOURCE"]

VALIDATION_HOLDOUT = 5000  # VDVAE's data.py splits this many training images off for validation
BATCHES = 5
FOLDER = "cifar-10-batches-py"
CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise RuntimeError("making the CIFAR-format dataset needs scikit-learn (its bundled photos); "
                           "run: pip install scikit-learn") from e
    return [np.asarray(image, dtype=np.float32) for image in load_sample_images().images]


def crops(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """``n`` random ``size``x``size`` RGB crops as uint8 (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        zoom = int(rng.choice([1, 2, 4]))
        side = size * zoom
        top = rng.integers(photo.shape[0] - side + 1)
        left = rng.integers(photo.shape[1] - side + 1)
        patch = photo[top:top + side, left:left + side]
        patch = patch.reshape(size, zoom, size, zoom, 3).mean(axis=(1, 3))  # box-filter zoom-out
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out[i] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return out


def _write_batch(path: Path, images: np.ndarray, label: str) -> None:
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows: R plane, G, B
    batch = {b"batch_label": label.encode(), b"labels": [0] * len(images), b"data": planar,
             b"filenames": [f"crop_{i:06d}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make(dest: str | Path, n_train: int = 6000, n_test: int = 500, seed: int = 0, for_target: str = "vdvae") -> Path:
    """Write the dataset under ``dest``; returns ``dest`` (VDVAE's ``--data_root``, NVAE's and
    ``vaepatch run effvdvae``'s ``--data``)."""
    if for_target not in ("vdvae", "nvae", "effvdvae"):
        raise ValueError(f"for_target must be 'vdvae', 'nvae' or 'effvdvae', got {for_target!r}")
    if n_train < BATCHES:
        raise ValueError(f"n_train={n_train}: need at least {BATCHES} training images (one per batch file)")
    if for_target == "vdvae" and n_train <= VALIDATION_HOLDOUT:
        raise ValueError(f"n_train={n_train}: VDVAE holds out {VALIDATION_HOLDOUT} training images for "
                         f"validation, so n_train must exceed that (e.g. {VALIDATION_HOLDOUT + 16 * 50} "
                         "for 50 steps of batch 16)")
    if n_test < 1:
        raise ValueError(f"n_test={n_test}: need at least one test image")
    folder = Path(dest) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images = crops(n_train + n_test, seed=seed)
    for b, chunk in enumerate(np.array_split(images[:n_train], BATCHES), start=1):
        _write_batch(folder / f"data_batch_{b}", chunk, f"training batch {b} of {BATCHES}")
    _write_batch(folder / "test_batch", images[n_train:], "testing batch 1 of 1")
    return Path(dest)


def missing(root: str | Path) -> list[str]:
    """The CIFAR-10 batch files (``cifar-10-batches-py/...``) absent under ``root``; [] when complete."""
    names = [f"data_batch_{b}" for b in range(1, BATCHES + 1)] + ["test_batch"]
    return [f"{FOLDER}/{n}" for n in names if not (Path(root) / FOLDER / n).is_file()]


def read(root: str | Path, train: bool = True) -> tuple[np.ndarray, list[int]]:
    """Images (N, 32, 32, 3) uint8 and labels from ``root/cifar-10-batches-py``, as torchvision reads them."""
    folder = Path(root) / FOLDER
    names = [f"data_batch_{b}" for b in range(1, BATCHES + 1)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no CIFAR-10 ({'training' if train else 'test'} batches {', '.join(missing)}) under {folder}. "
            f"Unpack {CIFAR_SOURCE} into {Path(root)}, or write a small stand-in with `vaepatch make-data {root}`.")
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        # keys are str in the real (Python 2 pickled) files, bytes in make-data's
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch.get("labels", batch.get("fine_labels", [])))
    return np.concatenate(images), labels


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vaepatch make-data",
                                     description="write a small CIFAR-10-format dataset from scikit-learn's "
                                                 "bundled photos")
    parser.add_argument("dest", help="folder to write (becomes VDVAE's --data_root or NVAE's --data)")
    parser.add_argument("--train", type=int, default=6000,
                        help=f"training images (> {VALIDATION_HOLDOUT} for VDVAE, which holds that many out)")
    parser.add_argument("--for", dest="for_target", choices=["vdvae", "nvae", "effvdvae"], default="vdvae",
                        help="which upstream will read it (NVAE and Efficient-VDVAE take any --train)")
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        dest = make(args.dest, args.train, args.test, args.seed, args.for_target)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.train} training + {args.test} test images to {dest / FOLDER}")
    return 0
