"""MNIST images from a local file, never downloaded: an .npz with key ``data`` or the canonical IDX files.

Shared by the benches that train on MNIST (decoder-variance, ou-collapse, phase): the file comes from
their ``--data`` flag or ``$VAEPATCH_MNIST`` (:func:`resolve`), never from a default path.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["ENV", "MNIST_SOURCE", "resolve", "load_mnist"]

ENV = "VAEPATCH_MNIST"
MNIST_SOURCE = "http://yann.lecun.com/exdb/mnist/ (t10k-images-idx3-ubyte.gz or train-images-idx3-ubyte.gz)"
IDX_MAGIC = 0x00000803  # unsigned byte, 3 dimensions


def resolve(path=None) -> str:
    """The MNIST file to read: ``path`` (a --data flag), else ``$VAEPATCH_MNIST``, else an error naming
    both and the canonical source. Whether the file exists is :func:`load_mnist`'s to say."""
    path = path or os.environ.get(ENV)
    if not path:
        raise FileNotFoundError(f"no MNIST file given: pass --data PATH or set ${ENV} "
                                f"(an .npz with key 'data', or the IDX images from {MNIST_SOURCE}); "
                                "nothing is downloaded")
    return str(path)


def load_mnist(path) -> np.ndarray:
    """The images of an MNIST file as an (N, 28, 28) uint8 array; never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file {str(path)!r} does not exist (or is not a file); "
                                f"get it from {MNIST_SOURCE}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(f"MNIST file {str(path)!r} is unreadable: {e}") from e
    images = _from_npz(raw, path) if raw[:4] == b"PK\x03\x04" else _from_idx(raw, path)  # .npz is a zip
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
        raise ValueError(f"MNIST file {str(path)!r}: expected N x 28 x 28 uint8 images, "
                         f"got shape {images.shape} dtype {images.dtype}")
    return images


def _from_npz(raw, path):
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"MNIST file {str(path)!r} is unreadable as .npz: {e}") from e
    if "data" not in arrays:
        raise ValueError(f"MNIST file {str(path)!r}: no array named 'data' (has {sorted(arrays)})")
    return arrays["data"]


def _from_idx(raw, path):
    if len(raw) < 16 or struct.unpack(">I", raw[:4])[0] != IDX_MAGIC:
        raise ValueError(f"MNIST file {str(path)!r} is neither an .npz nor an IDX image file "
                         f"(magic {IDX_MAGIC:#010x}, as at {MNIST_SOURCE})")
    n, rows, cols = struct.unpack(">III", raw[4:16])
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"MNIST file {str(path)!r}: IDX header says {n} x {rows} x {cols} "
                         f"but holds {len(raw) - 16} pixel bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)
