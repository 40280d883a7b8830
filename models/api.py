"""weakloc's core steps from Python, without Beam: load a model, CAMs and boxes for an array batch, draw an overlay.

    from weakloc.models import api

    loc = api.load("fruit.keras")                         # the sidecar and <model>.thresholds.json beside it
    found = loc(images)                                    # uint8 (B, H, W, 3), any H, W
    found[0]["boxes"]                                      # [{"label", "score", "xmin", ...}] in the image's pixels
    api.draw(images[0], found[0]).save("overlay.png")      # CAM of the top class, and every box

Each result is the row `weakloc label` writes for that image (models/schema.py ANNOTATION_SCHEMA as a dict, with
the low-resolution `cams` included), so what a script sees is what the pipeline stores.
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from . import annotate, visualize
from .annotate import BoxOptions, ImageMeta
from .files import read_json
from .opening import open_model
from .thresholds import Thresholds


@dataclasses.dataclass
class Localizer:
    """A loaded model with its box options: call it on a batch of pictures."""

    method: object  # a cam.CamMethod
    spec: object  # an opening.ModelSpec
    options: BoxOptions

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def __call__(self, images, labels: Optional[Sequence[Sequence[str]]] = None) -> list[dict]:
        """CAMs and boxes of a batch.

        Args:
          images: uint8 (B, H, W, 3) array, or a sequence of (H_i, W_i, 3) arrays of any sizes; each is resized
            (bilinear) to the model input, and boxes come back in its own pixels (x0y0x1y1, max edge exclusive).
          labels: per image, class names to box as well (with `classes="labels"` or `"both"` at load).

        Returns:
          One dict per image: image_id ("0", "1", ...), width, height, classes (top-k with scores), boxes and cams.
        """
        pictures = [np.asarray(im) for im in images]
        for i, im in enumerate(pictures):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
        h, w = self.spec.input_size
        batch = np.stack([im if im.shape[:2] == (h, w) else
                          np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR))
                          for im in pictures])
        names = labels or [[] for _ in pictures]
        metas = []
        for i, (im, lab) in enumerate(zip(pictures, names)):
            ids, texts = annotate.resolve_labels([], list(lab), self.class_names)
            metas.append(ImageMeta(image_id=str(i), source="array", width=im.shape[1], height=im.shape[0],
                                   label_ids=ids, label_texts=texts))
        extra = annotate.extra_classes(metas, self.options)
        out = self.method(batch, extra)
        return annotate.annotate_batch(out, metas, self.class_names, self.options, self.spec.name, extra)


def load(model: str, *, thresholds: Optional[str] = None, method: str = "cam", top_k: int = 1,
         classes: str = "predicted", boxes: str = "largest", cam_threshold: Optional[float] = None,
         sidecar: Optional[str] = None) -> Localizer:
    """Open a model as `weakloc label` does (sidecar beside it, `<model>.thresholds.json` if there).

    Args:
      model: a .keras/.h5 file (local or any Beam filesystem) or `keras:NAME`.
      thresholds: a calibrate output (default: the one beside the model, if any); `cam_threshold` overrides its
        default tau (else 0.2 without a file).
      method, top_k, classes, boxes: as label's --method, --top_k, --classes, --boxes.

    Raises:
      opening.ModelFileError, graph.ModelStructureError, sidecar.SidecarError, thresholds.ThresholdsError.
    """
    from apache_beam.io.filesystems import FileSystems

    thr_path = thresholds
    if thr_path is None and ":" not in model.split("/")[0]:
        beside = posixpath.splitext(model)[0] + ".thresholds.json"
        thr_path = beside if FileSystems.exists(beside) else None
    thr = Thresholds.from_json(read_json(thr_path, "thresholds"), where=thr_path) if thr_path else Thresholds()
    opened = open_model(model, sidecar_path=sidecar, method=method, contrast=bool(thr.cam_contrast))
    names = opened.spec.class_names
    index = {n: i for i, n in enumerate(names)}
    per_class = {index[n]: t for n, t in thr.per_class.items() if n in index}
    tau = cam_threshold if cam_threshold is not None else (thr.default if thr.default is not None else 0.2)
    opts = BoxOptions(classes=classes, top_k=top_k, default_threshold=tau, per_class=per_class, mode=boxes,
                      emit_cams=True, stretch=tuple(thr.box_stretch or (1.0, 1.0)), refine=thr.box_refine)
    return Localizer(opened.build(top_k=top_k), opened.spec, opts)


def draw(image, result: dict, *, class_name: Optional[str] = None, max_side: int = 512) -> Image.Image:
    """The picture with the CAM of `class_name` (default: the top box's class) blended in, and every box.

    Args:
      image: uint8 (H, W, 3), the picture `result` was computed on; result: one item of `Localizer(...)`.
    """
    img = Image.fromarray(np.asarray(image, np.uint8))
    small, scale = visualize.fit(img, max_side, upscale=True)
    boxes = result.get("boxes") or []
    wanted = class_name or (boxes[0]["label"] if boxes else None)
    cam = next((np.asarray(c["values"], np.float32).reshape(c["height"], c["width"])
                for c in result.get("cams") or []
                if any(b["class_id"] == c["class_id"] and b["label"] == wanted for b in boxes)), None)
    if cam is not None:
        small = visualize.cam_overlay(small, cam)
    shown = [dict(b, color=visualize.color(b["class_id"]), caption=f"{b['label']} {b['score']:.2f}") for b in boxes]
    return visualize.draw_boxes(small, shown, scale=scale)
