"""Cluttered MNIST: real handwritten digits pasted on a larger canvas among fragments of other digits.

The benchmark of issue 3: a 96x96 RGB canvas, one digit rescaled to 20-40 px at a uniformly random position fully
inside, 6-10 clutter fragments (random 8x8 crops of other digits) and mild Gaussian noise. The class is the digit;
the true box is the tight box of the pasted digit's ink (value > 0.3 of its max), x0y0x1y1 in continuous pixel
coordinates, max edge exclusive. Digits are read from the official IDX files (gzipped or not).
"""
from __future__ import annotations

import gzip
import logging
import os
import struct

import numpy as np
from PIL import Image

from .synthetic import ShapesSet

logger = logging.getLogger(__name__)

DIGITS = tuple(str(d) for d in range(10))
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


class MnistError(ValueError):
    """IDX files that are missing or not what their header says."""


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip detected from the bytes): uint8 (N,) labels or (N, rows, cols) images.

    Raises:
      MnistError: unknown magic number or a body shorter than the header announces.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 8:
        raise MnistError(f"{path}: {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic == IMAGES_MAGIC:
        n, rows, cols = struct.unpack(">III", data[4:16])
        shape, start = (n, rows, cols), 16
    elif magic == LABELS_MAGIC:
        (n,) = struct.unpack(">I", data[4:8])
        shape, start = (n,), 8
    else:
        raise MnistError(f"{path}: magic number {magic}, expected {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels)")
    need = int(np.prod(shape))
    if len(data) - start < need:
        raise MnistError(f"{path}: header announces {need} bytes of data, found {len(data) - start}")
    return np.frombuffer(data, np.uint8, count=need, offset=start).reshape(shape)


def load_idx_dir(directory: str, prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """`<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` -> (uint8 (N, 28, 28), uint8 (N,))."""

    def find(kind):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
        raise MnistError(f"no {prefix}-{kind}[.gz] in {directory}")

    images = read_idx(find("images-idx3-ubyte"))
    labels = read_idx(find("labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MnistError(f"{directory}: {images.shape} images do not pair with {labels.shape} labels")
    return images, labels


def load_keras_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test set through keras.datasets (downloads it once; needs the internet).

    Raises:
      MnistError: the download failed (offline machine), with what to do instead.
    """
    import keras

    try:
        _, (x, y) = keras.datasets.mnist.load_data()
    except Exception as exc:  # urllib errors, DNS failures, proxies: all mean "could not fetch"
        raise MnistError(
            f"could not download MNIST through keras.datasets ({type(exc).__name__}: {exc}); on an offline "
            "machine pass --idx_dir DIR holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        ) from None
    return x, y


def make_cluttered(
    digits: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    size: int = 96,
    digit_px: tuple[int, int] = (20, 40),
    fragments: tuple[int, int] = (6, 10),
    fragment_px: int = 8,
    noise: float = 8.0,
    ink: float = 0.3,
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[ShapesSet, np.ndarray]:
    """Make `n` cluttered canvases from a pool of digits (their source indices are returned too).

    Args:
      digits: uint8 (P, 28, 28) the pool; every pasted digit and every fragment comes from it.
      labels: uint8 (P,) their classes.
      per_class: if set, exactly this many canvases of each class (n is then 10 * per_class).
      noise: standard deviation of the Gaussian noise, in uint8 grey levels.

    Returns:
      (ShapesSet with uint8 (n, size, size, 3) images, int64 labels, float32 (n, 4) boxes, class names "0".."9";
       int64 (n,) index into the pool of each canvas's digit).
    """
    rng = np.random.default_rng(seed)
    if per_class is not None:
        picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
        picks = rng.permutation(picks)
        n = len(picks)
    else:
        picks = rng.integers(0, len(digits), n)
    images = np.empty((n, size, size, 3), np.uint8)
    boxes = np.empty((n, 4), np.float32)
    src_h, src_w = digits.shape[1:]
    for i, idx in enumerate(picks):
        canvas = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(fragments[0], fragments[1] + 1)):
            other = digits[rng.integers(0, len(digits))]
            # Crops from the inner part of the 28x28 frame, where the ink is (MNIST digits sit in a 20x20 box).
            lo_y, lo_x = (src_h - 20) // 2, (src_w - 20) // 2
            fy = rng.integers(lo_y, lo_y + 20 - fragment_px + 1)
            fx = rng.integers(lo_x, lo_x + 20 - fragment_px + 1)
            py, px = rng.integers(0, size - fragment_px + 1, size=2)
            region = canvas[py : py + fragment_px, px : px + fragment_px]
            np.maximum(region, other[fy : fy + fragment_px, fx : fx + fragment_px], out=region)
        s = int(rng.integers(digit_px[0], digit_px[1] + 1))
        digit = np.asarray(Image.fromarray(digits[idx]).resize((s, s), Image.Resampling.BILINEAR), np.float32)
        y0, x0 = rng.integers(0, size - s + 1, size=2)
        region = canvas[y0 : y0 + s, x0 : x0 + s]
        np.maximum(region, digit, out=region)
        ys, xs = np.nonzero(digit > ink * digit.max())
        boxes[i] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        canvas += rng.normal(0.0, noise, canvas.shape)
        images[i] = np.clip(canvas, 0, 255).astype(np.uint8)[..., None]
    return ShapesSet(images=images, labels=labels[picks].astype(np.int64), boxes=boxes, class_names=DIGITS), picks
