"""`label` flags of co-localization (`--method coloc|fused`) and multi-scale test-time averaging, checked at launch.

    weakloc label ... --method coloc                       # statistics of this input, written beside the rows
    weakloc label ... --method fused --coloc_stats PREV/    # a later run reuses them: one pass, nothing recomputed
    weakloc label ... --method coloc --coloc_layer auto     # on a 2x finer map (MobileNetV2: block_12_add)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional

from weakloc.models import coloc, graph
from weakloc.models.coloc import MAPS, ColocConfig
from weakloc.models.opening import ModelSpec, OpenedModel

from .options import OptionsError, beside_thresholds

logger = logging.getLogger(__name__)


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fuse", choices=coloc.FUSE_MODES, default="mean",
                       help="--method fused: the mean, or the geometric mean (product), of the min-max normalised "
                            "CAM and co-localization maps")
    group.add_argument("--coloc_layer", metavar="NAME|auto",
                       help="--method coloc|fused: co-localize on this top-level layer's feature map instead of the "
                            "GAP head's; auto: the residual stream (last Add layer) at twice the head's resolution "
                            "(stride 16, e.g. MobileNetV2 block_12_add, 14x14 at 224)")
    group.add_argument("--coloc_stats", metavar="PATH",
                       help="--method coloc|fused: reuse the co-localization statistics an earlier run wrote "
                            "(its output folder or coloc_stats.json) instead of computing them from this input")
    group.add_argument("--tta_scales", metavar="S1,S2,...",
                       help="multi-scale test-time averaging: also run each picture resized by these factors and "
                            "average the feature maps on the largest scale's grid (e.g. 1,2; default 1)")


def follow_thresholds(args: argparse.Namespace, thr, thr_path: Optional[str]) -> argparse.Namespace:
    """The flags a thresholds file naming a co-localization method implies (`--method coloc|fused`, `--fuse`,
    `--coloc_stats` = the statistics calibrate wrote beside it), so label makes the maps calibrate scored with no
    other flag. An explicit --coloc_stats still wins; --method gradcam cannot make them. Returns a copy."""
    method = thr.chosen_method() if thr is not None else None
    if method is None or method.coloc == "none":
        return args
    if args.method == "gradcam":
        raise OptionsError(f"{thr_path} was calibrated on co-localization maps ({method.name}), which --method "
                           "gradcam cannot make")
    out = argparse.Namespace(**vars(args))
    out.method = "coloc" if method.coloc == "coloc" else "fused"
    if method.coloc != "coloc":
        out.fuse = method.coloc
    if not args.coloc_layer:
        out.coloc_layer = method.coloc_layer
    if not args.coloc_stats:
        out.coloc_stats = beside_thresholds(thr_path, method.coloc_stats)
    logger.info("%s names %s: --method %s with the statistics %s", thr_path, method.name, out.method,
                out.coloc_stats)
    return out


def parse_scales(value: Optional[str]) -> tuple[float, ...]:
    if value is None:
        return (1.0,)
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise OptionsError(f"--tta_scales expects comma-separated factors (e.g. 1,2), got {value!r}") from None
    if not scales or any(not 0.25 <= s <= 4.0 for s in scales) or len(set(scales)) != len(scales):
        raise OptionsError(f"--tta_scales factors must be distinct and within [0.25, 4], got {value!r}")
    return scales


def extractor(spec: ModelSpec, keras_model) -> dict:
    """What makes the descriptors: statistics from another extractor do not apply."""
    if spec.coloc_layer:
        channels = graph.layer_features(keras_model, spec.coloc_layer).shape[-1]
    else:
        channels = coloc.ColocModel.find_head(keras_model, **spec.head_options()).dense.kernel.shape[0]
    return {"model_sha256_16": spec.fingerprint or spec.name, "feature_layer": spec.feature_layer,
            "coloc_layer": spec.coloc_layer, "channels": int(channels), "input_size": list(spec.input_size),
            "flip_tta": bool(spec.flip_tta), "tta_scales": list(spec.tta_scales)}


def resolve_layer(keras_model, spec: ModelSpec, layer: Optional[str]) -> Optional[str]:
    """The concrete layer name of `--coloc_layer` (auto: `graph.finer_layer`), checked to give a feature map.

    Raises:
      OptionsError: no such layer, or no map of the kind asked for.
    """
    if not layer:
        return None
    try:
        if layer == "auto":
            head = coloc.ColocModel.find_head(keras_model, **spec.head_options())
            layer = graph.finer_layer(keras_model, head)
        graph.layer_features(keras_model, layer)
    except graph.ModelStructureError as exc:
        raise OptionsError(str(exc)) from None
    return layer


def with_layer(args: argparse.Namespace, opened: OpenedModel, spec: ModelSpec) -> ModelSpec:
    """`spec` with the layer `--coloc_layer` names (auto resolved and logged).

    Raises:
      opening.ModelFileError: another method than coloc|fused (ModelSpec refuses it, before any layer is looked for).
      OptionsError: the layer cannot be read (`resolve_layer`).
    """
    if not getattr(args, "coloc_layer", None):
        return spec
    spec = dataclasses.replace(spec, coloc_layer=args.coloc_layer)
    layer = resolve_layer(opened.keras_model, spec, args.coloc_layer)
    if args.coloc_layer == "auto":
        logger.info("--coloc_layer auto: co-localizing on %s", layer)
    return dataclasses.replace(spec, coloc_layer=layer)


def validate(args: argparse.Namespace, opened: OpenedModel, spec: ModelSpec) -> Optional[ColocConfig]:
    """The ColocConfig of `--method coloc|fused` (None for other methods); reads --coloc_stats now."""
    if args.method not in MAPS:
        for flag, given in (("--coloc_stats", args.coloc_stats), ("--fuse", args.fuse != "mean")):
            if given:
                raise OptionsError(f"{flag} goes with --method coloc|fused, not --method {args.method}")
        return None
    if spec.contrast:
        raise OptionsError("contrast CAMs (--cam_contrast or the thresholds file's cam_contrast) change CAM "
                           "weights; co-localization maps do not use them")
    made_by = extractor(spec, opened.keras_model)
    components = None
    if args.coloc_stats:
        try:
            loaded = coloc.read_stats(args.coloc_stats, class_names=spec.class_names, extractor=made_by,
                                      with_stats=False)
        except coloc.ColocError as exc:
            raise OptionsError(str(exc)) from None
        components = loaded.components
        logger.info("co-localization statistics of %d classes from %s", len(components), args.coloc_stats)
    return ColocConfig(maps=args.method, fuse=args.fuse, extractor=made_by,
                       stats_path=args.coloc_stats, components=components)
