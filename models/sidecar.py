"""The JSON sidecar that travels with a model: how to turn pixels into model input, and the class names.

`cls.keras` -> `cls.json`:  {"input_size": [H, W], "scale": s, "offset": o, "class_names": [...]}
meaning RGB uint8 resized (bilinear) to input_size, then `x * scale + offset`. Unknown keys are kept verbatim
(training metadata, fingerprints) so that reading and rewriting a sidecar never loses anything.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Any, Sequence

logger = logging.getLogger(__name__)

_KNOWN = ("input_size", "scale", "offset", "class_names")


class SidecarError(ValueError):
    """A sidecar (or a flag overriding it) that does not describe a usable model input."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Validated preprocessing and labels for one model.

    input_size: (H, W) in pixels; scale, offset: model input = uint8 pixels * scale + offset;
    class_names: one name per model output, in output order; extra: every other sidecar key, untouched.
    """

    input_size: tuple[int, int]
    scale: float
    offset: float
    class_names: tuple[str, ...]
    extra: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            input_size=list(self.input_size),
            scale=self.scale,
            offset=self.offset,
            class_names=list(self.class_names),
        )
        return out


def sidecar_path(model_path: str) -> str:
    """`dir/cls.keras` -> `dir/cls.json` (works for local, gs:// and s3:// paths alike)."""
    root, _ = posixpath.splitext(model_path)
    return root + ".json"


def parse_sidecar(doc: Any, *, where: str = "sidecar") -> dict[str, Any]:
    """Check the types of a sidecar document and return it as a dict; missing keys are allowed here."""
    if not isinstance(doc, dict):
        raise SidecarError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    out = dict(doc)
    if "input_size" in out:
        size = out["input_size"]
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise SidecarError(f"{where}: input_size must be [H, W] with positive integers, got {size!r}")
        out["input_size"] = (int(size[0]), int(size[1]))
    for key in ("scale", "offset"):
        if key in out:
            val = out[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise SidecarError(f"{where}: {key} must be a number, got {val!r}")
            out[key] = float(val)
    if "class_names" in out:
        names = out["class_names"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise SidecarError(f"{where}: class_names must be a list of non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if list(names).count(n) > 1})
            raise SidecarError(f"{where}: class_names must be unique; repeated: {dupes}")
        out["class_names"] = tuple(names)
    return out


def resolve_preprocessing(
    sidecar: dict[str, Any] | None,
    *,
    overrides: dict[str, Any] | None = None,
    model_input_size: tuple[int | None, int | None] | None = None,
    num_classes: int,
) -> Preprocessing:
    """Merge sidecar, flag overrides and what the model itself says, and check they agree.

    Precedence: flag > sidecar > model > default. A default picked for the user is logged as a warning.

    Raises:
      SidecarError: the class count or input size disagrees with the model, or a value is malformed.
    """
    merged = parse_sidecar(sidecar or {}, where="sidecar")
    merged.update(parse_sidecar({k: v for k, v in (overrides or {}).items() if v is not None}, where="flag"))

    static_size = None
    if model_input_size and all(isinstance(v, int) for v in model_input_size):
        static_size = (int(model_input_size[0]), int(model_input_size[1]))
    if "input_size" not in merged:
        if static_size is None:
            raise SidecarError(
                "the model accepts any input size and no input_size was given: add it to the sidecar "
                "or pass --input_size H,W"
            )
        merged["input_size"] = static_size
        logger.warning("no input_size in sidecar or flags; using the model's own input %s", static_size)
    elif static_size is not None and tuple(merged["input_size"]) != static_size:
        raise SidecarError(
            f"input_size {list(merged['input_size'])} does not match the model's input {list(static_size)}"
        )
    if "scale" not in merged:
        merged["scale"] = 1.0 / 255.0
        logger.warning("no scale in sidecar or flags; using 1/255 (pixels in [0, 1])")
    if "offset" not in merged:
        merged["offset"] = 0.0
        logger.warning("no offset in sidecar or flags; using 0.0")
    if "class_names" not in merged:
        merged["class_names"] = tuple(f"class_{i}" for i in range(num_classes))
        logger.warning("no class_names in sidecar or flags; naming classes class_0..class_%d", num_classes - 1)
    if len(merged["class_names"]) != num_classes:
        raise SidecarError(
            f"class_names has {len(merged['class_names'])} names but the model predicts {num_classes} classes"
        )
    extra = {k: v for k, v in merged.items() if k not in _KNOWN}
    return Preprocessing(
        input_size=tuple(merged["input_size"]),
        scale=merged["scale"],
        offset=merged["offset"],
        class_names=tuple(merged["class_names"]),
        extra=extra,
    )


def dumps(prep: Preprocessing) -> str:
    return json.dumps(prep.to_json(), indent=2, sort_keys=True) + "\n"


def class_names_from_flag(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """`--class_names a,b,c` -> ("a", "b", "c")."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    return tuple(value)
