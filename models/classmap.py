"""A dataset's labels in terms of a model's classes (`--class_map`), so an off-the-shelf classifier boxes a
dataset's classes with no training: `{"apple": ["Granny Smith"], "kangaroo": "wallaby", "raccoon": []}`.

The dataset labels become the class space of the boxes: a box's `label` is the dataset label and its `class_id`
the label's position in the file. A label mapped to several model classes gets one map, the sum (default) or
the element-wise max of their raw CAMs at feature-map resolution, and one score, the sum of their probabilities
(the chance of any of them). A label mapped to nothing (`[]` or null) is declared but gets no boxes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from typing import Mapping, Sequence

import numpy as np

COMBINES = ("max", "sum")
# The sum of raw CAMs is the CAM of the summed class weights (one merged class); on the shared photos it beat the
# max by 4 points of GT-known Loc @0.5 and 2 of AP50 (BENCHMARKS.md, off-the-shelf table).
DEFAULT_COMBINE = "sum"


class ClassMapError(ValueError):
    """A --class_map file that is malformed or names classes the model does not have."""


@dataclasses.dataclass(frozen=True)
class ClassMap:
    """labels: dataset labels in file order (their index is the boxes' class id); members: per label, the model
    class ids whose maps make its map (() for a label declared but not boxed); combine: "max" or "sum"."""

    labels: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]
    combine: str = DEFAULT_COMBINE

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ClassMapError(f"class map: combine must be one of {COMBINES}, got {self.combine!r}")
        if len(self.labels) != len(self.members):
            raise ClassMapError(f"class map: {len(self.labels)} labels but {len(self.members)} member lists")

    def label_of(self) -> dict[int, int]:
        """{model class id: label id} for every mapped model class."""
        return {c: j for j, ms in enumerate(self.members) for c in ms}

    def combine_maps(self, low: np.ndarray) -> np.ndarray:
        """float32 (h, w) one label's map from its classes' raw CAMs, float (n, h, w)."""
        return (low.max(axis=0) if self.combine == "max" else low.sum(axis=0)).astype(np.float32)

    def to_json(self, class_names: Sequence[str]) -> dict:
        return {"combine": self.combine,
                "labels": {lab: [class_names[c] for c in ms] for lab, ms in zip(self.labels, self.members)}}


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def resolve_class(name: str, class_names: Sequence[str], aliases: Mapping[str, list[int]]) -> int:
    """The model class id a class-map entry names: the exact class name, else the one class that has it as a
    comma-separated alias, case, spaces and underscores aside ("Granny_Smith", "wallaby" for "wallaby, brush
    kangaroo"); a name two classes share ("crane") is refused."""
    if name in class_names:
        return list(class_names).index(name)
    hits = aliases.get(_key(name), [])
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ClassMapError(f"class map: {name!r} could be any of the model classes "
                            f"{[class_names[h] for h in hits]}; name one exactly")
    raise ClassMapError(f"class map: {name!r} is not a class of the model (nor an alias of one)")


def _entries_from_csv(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if not cells[0]:
            raise ClassMapError(f"class map: CSV line {n} has no dataset label in its first cell: {row!r}")
        out.setdefault(cells[0], []).extend(c for c in cells[1:] if c)
    return out


def _entries_from_json(text: str) -> dict[str, list[str]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClassMapError(f"class map: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ClassMapError(f"class map: expected a JSON object of dataset label -> model class names, got "
                            f"{type(doc).__name__}")
    out = {}
    for lab, val in doc.items():
        val = [] if val is None else [val] if isinstance(val, str) else val
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            raise ClassMapError(f"class map: {lab!r} must map to a model class name or a list of them, got {val!r}")
        out[lab] = val
    return out


def parse_class_map(text: str, class_names: Sequence[str], *, fmt: str = "json",
                    combine: str = DEFAULT_COMBINE) -> ClassMap:
    """A class-map document (fmt "json" or "csv": `label,class[,class...]` a line, `#` comments) -> ClassMap.

    Raises:
      ClassMapError: malformed document, no label at all, a name that is not a class of the model, or a model
        class mapped from two labels (a box of it would have two names).
    """
    entries = _entries_from_json(text) if fmt == "json" else _entries_from_csv(text)
    if not entries:
        raise ClassMapError("class map: it maps no dataset label")
    aliases: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        # An ImageNet name made unique by its synset id ("crane_n02012849") is also known by its bare name.
        bare = re.sub(r"_n\d{8}$", "", name)
        for alias in {_key(name), *(_key(p) for p in bare.split(","))}:
            aliases.setdefault(alias, []).append(i)
    members, owner = [], {}
    for lab, names in entries.items():
        ids = tuple(dict.fromkeys(resolve_class(n, class_names, aliases) for n in names))
        for c in ids:
            if c in owner:
                raise ClassMapError(f"class map: model class {class_names[c]!r} is mapped from both {owner[c]!r} "
                                    f"and {lab!r}")
            owner[c] = lab
        members.append(ids)
    return ClassMap(tuple(entries), tuple(members), combine)


def check_labels(labels, cmap: ClassMap, where: str) -> None:
    """Refuse dataset labels (an iterable of names) that the class map does not declare, in one line."""
    missing = sorted(set(labels) - set(cmap.labels))
    if missing:
        raise ClassMapError(f"{where} holds labels {missing} that the class map does not map; add them (map a "
                            f"label to [] to leave it unboxed)")
