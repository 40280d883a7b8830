"""The thresholds file: the one declaration of what `calibrate` (and `demo`) write and `label --thresholds` reads.

    {"default": 0.34,                          tau for classes without their own
     "per_class": {"cat": 0.41},               tau per class name
     "per_class_shrink": 10.0,                 how far calibrate pulled each per_class tau towards default: as if
                                               this many more maps had chosen default (a record, >= 0)
     "cam_contrast": true,                     the maps were contrast CAMs: label makes the same kind
     "box_stretch": [0.9, 1.2],                scale box width and height about the centre
     "box_refine": {...},                      a refine.BoxRefiner (replaces the stretch)
     "box_refine_fit": {...},                  how the refinement was chosen (a record, not read back)
     "instances": {"min_rel_area": 0.1,        --boxes instances: which components become instance boxes
                   "min_peak": 0.5, "nms_iou": 0.3,    (a boxes.InstanceRule, chosen by calibrate --boxes instances;
                   "peak_distance": 0.1},              peak_distance optional, 0 when absent)
     "method": {"name": "contrast_refine",     the method calibrate chose (models/choose.py): label makes
                "flip_tta": false,             flip-averaged maps or not, and boxes them with this rule,
                "boxes": "largest",            unless a flag says otherwise
                "min_box_area": 0.01,
                "coloc": "product",            co-localization maps (models/coloc.py): "coloc", or fused with
                "coloc_stats": "x.coloc",      the CAM by "mean"/"product"; their statistics' folder, relative
                "coloc_layer": "block_12_add", to this file, and the layer whose map they read (null:
                                               the GAP head's); all three absent for CAM methods
                "regressor": "x.regress.npz",  a self-trained box regressor (models/regressor.py), relative to
                "regress_blend": 0.5},         this file, and the weight of its box against the map's own
                                               (both absent without one)
     "candidates": [...],                      every method calibrate tried, cross-validated (a record)
     "calibration": {...}}                     the sweep and where it ran (a record, not read back)

Every key is optional. Keys this version does not know are kept as they are, so reading and writing a file
never loses anything.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

from . import defaults
from .boxes import InstanceRule
from .refine import BoxRefiner

# The keys that mean something to `label`, in the order they are written.
_KNOWN = ("default", "per_class", "per_class_shrink", "cam_contrast", "box_stretch", "box_refine", "box_refine_fit", "instances",
          "method", "candidates", "calibration")
_BOX_RULES = ("largest", "all", "union", "instances")  # annotate.BOX_MODES (annotate imports this module's neighbours)
# Which maps a method boxes: "none" CAMs, "coloc" co-localization maps, "mean"/"product" the two fused
# (coloc.FUSE_MODES; coloc imports Beam's filesystems, which this module does not need).
COLOC_MAPS = ("none", "coloc", "mean", "product")


class ThresholdsError(ValueError):
    """A thresholds document that is malformed or does not fit the model."""


def _unit(name: str, val) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) <= 1.0:
        raise ThresholdsError(f"thresholds: {name} must be a number within [0, 1], got {val!r}")
    return float(val)


def parse_stretch(value, what: str) -> tuple[float, float]:
    """`"FW,FH"` or `[fw, fh]` -> (fw, fh), each within (0, 4]. Raises ThresholdsError naming `what`."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        fw, fh = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ThresholdsError(f"{what} expects two factors FW,FH (e.g. 0.85,1.3), got {value!r}") from None
    if not (0.0 < fw <= 4.0 and 0.0 < fh <= 4.0):
        raise ThresholdsError(f"{what} factors must lie within (0, 4], got {fw}, {fh}")
    return fw, fh


def _nested(value, from_json, where: str):
    """A nested document read by its own class (None stays None); its error, a ValueError, names the file."""
    if value is None:
        return None
    try:
        return from_json(value)
    except ValueError as exc:  # RefineError and InstanceRule's errors alike
        raise ThresholdsError(f"{exc} (in {where})") from None


@dataclasses.dataclass(frozen=True)
class Method:
    """Which maps and box rule the thresholds were chosen for; `label` follows them (flag > file > default).
    The default is plain CAM: what label does when nothing was calibrated."""

    name: str = "cam"
    flip_tta: bool = False
    boxes: str = "largest"
    min_box_area: float = defaults.MIN_BOX_AREA
    coloc: str = "none"
    coloc_stats: Optional[str] = None
    coloc_layer: Optional[str] = None  # the layer the co-localization maps read; None: the GAP head's features
    regressor: Optional[str] = None
    regress_blend: float = 1.0

    @classmethod
    def from_json(cls, doc, *, where: str = "thresholds") -> "Method":
        if not isinstance(doc, dict):
            raise ThresholdsError(f"method in {where} must be an object, got {type(doc).__name__}")
        out = cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc})
        if not isinstance(out.name, str):
            raise ThresholdsError(f"method.name in {where} must be a string, got {out.name!r}")
        if not isinstance(out.flip_tta, bool):
            raise ThresholdsError(f"method.flip_tta in {where} must be true or false, got {out.flip_tta!r}")
        if out.boxes not in _BOX_RULES:
            raise ThresholdsError(f"method.boxes in {where} must be one of {_BOX_RULES}, got {out.boxes!r}")
        if out.coloc not in COLOC_MAPS:
            raise ThresholdsError(f"method.coloc in {where} must be one of {COLOC_MAPS}, got {out.coloc!r}")
        if out.coloc != "none" and not isinstance(out.coloc_stats, str):
            raise ThresholdsError(f"method.coloc_stats in {where} must name the folder of the co-localization "
                                  f"statistics calibrate wrote, got {out.coloc_stats!r}")
        if out.coloc_layer is not None and (out.coloc == "none" or not isinstance(out.coloc_layer, str)
                                            or not out.coloc_layer):
            raise ThresholdsError(f"method.coloc_layer in {where} must name the layer of co-localization maps "
                                  f"(method.coloc {out.coloc!r}), got {out.coloc_layer!r}")
        if out.regressor is not None and not isinstance(out.regressor, str):
            raise ThresholdsError(f"method.regressor in {where} must name the regressor file calibrate wrote, got "
                                  f"{out.regressor!r}")
        if out.regressor is not None and (out.coloc != "none" or out.boxes != "largest"):
            raise ThresholdsError(f"method.regressor in {where} corrects largest-component CAM boxes only")
        blend = _unit(f"method.regress_blend in {where}", out.regress_blend)
        if blend == 0.0:
            raise ThresholdsError(f"method.regress_blend in {where} must be above 0")
        return dataclasses.replace(out, min_box_area=_unit(f"method.min_box_area in {where}", out.min_box_area),
                                   regress_blend=blend)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.coloc == "none":  # CAM methods: the file reads as it did before co-localization existed
            del out["coloc"], out["coloc_stats"], out["coloc_layer"]
        if self.regressor is None:  # likewise before the regressor
            del out["regressor"], out["regress_blend"]
        return out


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """A validated thresholds document (see the module docstring); `where` names it in errors."""

    default: Optional[float] = None
    per_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    per_class_shrink: Optional[float] = None
    cam_contrast: Optional[bool] = None
    box_stretch: Optional[tuple[float, float]] = None
    box_refine: Optional[BoxRefiner] = None
    box_refine_fit: Optional[dict] = None
    instances: Optional[InstanceRule] = None
    method: Optional[Method] = None
    candidates: Optional[list] = None
    calibration: Optional[dict] = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, doc, *, where: str = "thresholds") -> "Thresholds":
        """From the parsed JSON (or its text).

        Raises:
          ThresholdsError: not an object, a threshold outside [0, 1], a bad stretch, refinement or flag.
        """
        if isinstance(doc, (str, bytes)):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as exc:
                raise ThresholdsError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ThresholdsError(f"thresholds: expected a JSON object, got {type(doc).__name__}")
        default = doc.get("default")
        per = doc.get("per_class", {}) or {}
        if not isinstance(per, dict):
            raise ThresholdsError(f"thresholds: per_class must be an object of name -> value, got {per!r}")
        contrast = doc.get("cam_contrast")
        if contrast is not None and not isinstance(contrast, bool):
            raise ThresholdsError(f"cam_contrast in {where} must be true or false")
        shrink = doc.get("per_class_shrink")
        if shrink is not None and (isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or shrink < 0):
            raise ThresholdsError(f"per_class_shrink in {where} must be a number >= 0, got {shrink!r}")
        stretch = doc.get("box_stretch")
        refiner = _nested(doc.get("box_refine"), BoxRefiner.from_json, where)
        instances = _nested(doc.get("instances"), InstanceRule.from_json, where)
        calibration = doc.get("calibration")
        method = doc.get("method")
        return cls(
            default=None if default is None else _unit("default", default),
            per_class={n: _unit(f"per_class[{n!r}]", v) for n, v in per.items()},
            per_class_shrink=None if shrink is None else float(shrink),
            cam_contrast=contrast,
            box_stretch=None if stretch is None else parse_stretch(stretch, f"box_stretch in {where}"),
            box_refine=refiner,
            box_refine_fit=doc.get("box_refine_fit"),
            instances=instances,
            method=None if method is None else Method.from_json(method, where=where),
            candidates=doc.get("candidates"),
            calibration=calibration if isinstance(calibration, dict) else None,
            extra={k: v for k, v in doc.items() if k not in _KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"default": self.default, "per_class": dict(self.per_class)}
        if self.per_class_shrink is not None:
            out["per_class_shrink"] = self.per_class_shrink
        if self.cam_contrast is not None:
            out["cam_contrast"] = self.cam_contrast
        if self.box_stretch is not None:
            out["box_stretch"] = list(self.box_stretch)
        if self.box_refine is not None:
            out["box_refine"] = self.box_refine.to_json()
        if self.box_refine_fit is not None:
            out["box_refine_fit"] = self.box_refine_fit
        if self.instances is not None:
            out["instances"] = self.instances.to_json()
        if self.method is not None:
            out["method"] = self.method.to_json()
        if self.candidates is not None:
            out["candidates"] = self.candidates
        if self.calibration is not None:
            out["calibration"] = self.calibration
        out.update(self.extra)
        return out

    def class_ids(self, class_names: Sequence[str]) -> dict[int, float]:
        """per_class by model class id. Raises ThresholdsError for a name the model does not have."""
        index = {n: i for i, n in enumerate(class_names)}
        missing = sorted(set(self.per_class) - set(index))
        if missing:
            raise ThresholdsError(f"thresholds: per_class names {missing} are not classes of the model "
                                  f"{list(class_names)}")
        return {index[n]: t for n, t in self.per_class.items()}

    def calibrated_class_map(self) -> Optional[dict]:
        """The class map the maps were calibrated through ({"combine", "labels"}; None: not recorded)."""
        value = (self.calibration or {}).get("class_map")
        return value if isinstance(value, dict) else None

    def calibrated_flip_tta(self) -> Optional[bool]:
        """Whether the maps it was calibrated on were flip-averaged (None: not recorded)."""
        if self.method is not None:
            return self.method.flip_tta
        value = (self.calibration or {}).get("flip_tta")
        return value if isinstance(value, bool) else None

    def chosen_method(self) -> Method:
        """The method to label with: the one calibrate chose, or, in a file from before calibrate chose, what its
        calibration record says it was calibrated on (plain CAM where it says nothing)."""
        if self.method is not None:
            return self.method
        record = self.calibration or {}
        boxes = record.get("boxes")
        return Method(flip_tta=self.calibrated_flip_tta() or False,
                      boxes=boxes if boxes in _BOX_RULES else "largest")
