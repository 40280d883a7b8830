"""A synthetic weakly labelled dataset: one coloured shape per image, on clutter, with its true box kept aside.

Used by `weakloc demo` and the tests, so that everything runs on a fresh offline machine. The class is the shape;
clutter (short strokes and dots in random colours) and noise make the classifier look at the shape, and the true
box is the tight box of the shape's own pixels (x0y0x1y1, max edge exclusive), never shown to training.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


@dataclasses.dataclass(frozen=True)
class ShapesSet:
    """images: uint8 (N, S, S, 3); labels: int64 (N,); boxes: float32 (N, 4) pixels, x0y0x1y1 exclusive."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    class_names: tuple[str, ...] = SHAPES


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: float, y0: float, s: float, color, rng) -> None:
    x1, y1 = x0 + s, y0 + s
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif kind == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif kind == "cross":
        t = max(2.0, s / 3.5)
        cx, cy = x0 + s / 2, y0 + s / 2
        draw.rectangle([cx - t / 2, y0, cx + t / 2, y1], fill=color)
        draw.rectangle([x0, cy - t / 2, x1, cy + t / 2], fill=color)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def make_shapes(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    min_frac: float = 0.25,
    max_frac: float = 0.55,
    clutter: tuple[int, int] = (4, 8),
    noise: float = 8.0,
) -> ShapesSet:
    """Generate `n` images of `size` x `size`, classes balanced and shuffled, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    images = np.empty((n, size, size, 3), np.uint8)
    boxes = np.empty((n, 4), np.float32)
    for i, label in enumerate(labels):
        bg = rng.integers(20, 90, size=3)
        img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(clutter[0], clutter[1] + 1)):
            col = tuple(int(v) for v in rng.integers(60, 256, size=3))
            x, y = rng.uniform(0, size, size=2)
            if rng.random() < 0.5:
                dx, dy = rng.uniform(-size / 8, size / 8, size=2)
                draw.line([x, y, x + dx, y + dy], fill=col, width=int(rng.integers(1, 3)))
            else:
                r = rng.uniform(1, 2.5)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        s = rng.uniform(min_frac, max_frac) * size
        x0, y0 = rng.uniform(1, size - s - 1, size=2)
        color = tuple(int(v) for v in rng.integers(150, 256, size=3))
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), SHAPES[label], x0, y0, s, 255, rng)
        _draw_shape(draw, SHAPES[label], x0, y0, s, color, rng)
        ys, xs = np.nonzero(np.asarray(mask) > 0)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(size, size, 3))
        images[i] = np.clip(arr, 0, 255).astype(np.uint8)
    return ShapesSet(images=images, labels=labels.astype(np.int64), boxes=boxes)


def encode_png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def examples(data: ShapesSet, prefix: str):
    """Each picture of `data` as a serialized tf.train.Example with its label and normalised true box, ids
    `prefix-000000`, ... (for `files.write_tfrecord_shards`)."""
    from . import records

    size = data.images.shape[1]
    for i, (img, label, box) in enumerate(zip(data.images, data.labels, data.boxes)):
        yield records.make_example(
            encode_png(img),
            source_id=f"{prefix}-{i:06d}",
            labels=[int(label)],
            label_texts=[data.class_names[label]],
            boxes=[list(np.asarray(box) / size)],
            box_labels=[int(label)],
            box_texts=[data.class_names[label]],
            width=size,
            height=size,
        )
