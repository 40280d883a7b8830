"""Dataset-wide co-localization (DDT) and map fusion: plain numpy, no Beam.

Wei et al., "Deep Descriptor Transforming for Image Co-Localization" (IJCAI 2017; PR 2019): the descriptors
x (one K-vector per feature-map cell) of all images of a class are pooled; with mean m and covariance S of that
pool and v the first eigenvector of S, the co-localization map of an image of the class is

    P(i, j) = v . (x(i, j) - m)

positive where the cell looks like what the class's images share, i.e. the common object. The statistics are
sufficient and additive (count, sum, sum of outer products), so a Beam CombineFn merges them in any grouping
(transforms/coloc.py). The sign of an eigenvector is arbitrary: we fix it so that P correlates positively with
the class's CAM over the class's descriptors. With r the CAM resized to the feature grid, Cov(P, r) =
v . (E[x r] - m E[r]), so the statistics also sum x r and r over the cells (`cross`, `map_total`), and the rule is
read off them alone. On the GAP head's own features r = x . w_c and this is lambda v . w_c; the same rule holds
for an earlier, finer feature map (`--coloc_layer`, e.g. MobileNetV2's 14 x 14 block_13_expand_relu), whose
channels the Dense weights do not weigh. (The mean of P over the pool is zero by construction, so "make the mean
projection positive" cannot fix a sign.)

The statistics travel as one declared format: an `.npz` of arrays and a JSON manifest beside it (`encode`/`decode`;
the Beam side reads and writes them on any filesystem).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
from typing import Mapping, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems

from . import files
from .boxes import normalize_cams
from .cam import CamModel, upsample

logger = logging.getLogger(__name__)

FORMAT = "weakloc.coloc_stats"
VERSION = 2  # 2: the sums `cross` and `map_total` that sign a component on any feature layer
STATS_FILE = "coloc_stats.npz"
MANIFEST_FILE = "coloc_stats.json"
FUSE_MODES = ("mean", "product")
MAPS = ("coloc", "fused")  # the `--method` names whose maps come from here


class ColocError(ValueError):
    """Statistics that cannot be used: unknown format, a different feature extractor, too few descriptors."""


class ColocModel(CamModel):
    """The forward pass of co-localization: CamModel (CAMs, scores, flip and multi-scale averaging) that also
    returns a feature map, whose descriptors the statistics pool and the projection reads: the GAP head's, or
    with `coloc_layer` that of an earlier (finer) layer of the model (`graph.layer_features`)."""

    name = "coloc"

    def __init__(self, model, *, coloc_layer: str | None = None, **options):
        options.pop("features", None)
        super().__init__(model, features=True, features_layer=coloc_layer, **options)


@dataclasses.dataclass(frozen=True)
class ColocConfig:
    """How `label --method coloc|fused` makes its maps (validated at launch; picklable).

    maps: "coloc" (the projection alone) or "fused" (with the CAM, by `fuse`).
    extractor: what made the features (model, layer, channels, TTA), written into and checked against the file.
    components: {class id: Component} read from `--coloc_stats` (then nothing is recomputed), else None.
    """

    maps: str
    fuse: str
    extractor: dict
    stats_path: Optional[str] = None
    components: Optional[dict] = None


@dataclasses.dataclass
class ClassStats:
    """Sufficient statistics of one class's descriptors (float64, additive).

    images: how many images contributed; count: how many descriptors (cells); total: (K,) their sum;
    outer: (K, K) the sum of their outer products x x'; cross: (K,) the sum of x r and map_total the sum of r,
    r being the class's CAM at each cell (what signs the component, `principal_component`).
    """

    images: int
    count: int
    total: np.ndarray
    outer: np.ndarray
    cross: np.ndarray
    map_total: float = 0.0

    @classmethod
    def zeros(cls, k: int) -> "ClassStats":
        return cls(0, 0, np.zeros(k, np.float64), np.zeros((k, k), np.float64), np.zeros(k, np.float64))

    @classmethod
    def of(cls, features: np.ndarray, class_map: np.ndarray) -> "ClassStats":
        """Statistics of one image's feature map float (h, w, K) with the class's map (its CAM) on any grid,
        resized bilinearly onto the feature grid; or of any (..., K) stack of descriptors with one map value
        per descriptor (class_map of shape (...))."""
        features = np.asarray(features)
        k = features.shape[-1]
        x = features.astype(np.float64).reshape(-1, k)
        r = np.asarray(class_map, np.float32)
        if features.ndim == 3 and r.ndim == 2 and r.shape != features.shape[:2]:
            r = upsample(r[None], features.shape[:2])[0]
        r = r.astype(np.float64).reshape(-1)
        if len(r) != len(x):
            raise ValueError(f"a map of shape {np.shape(class_map)} does not go with features {features.shape}")
        return cls(1, len(x), x.sum(axis=0), x.T @ x, x.T @ r, float(r.sum()))

    def add(self, other: "ClassStats") -> "ClassStats":
        """Merge `other` into self (in place; returns self)."""
        if other.total.shape != self.total.shape:
            raise ColocError(f"cannot merge statistics of {other.total.shape[0]} and {self.total.shape[0]} channels")
        self.images += other.images
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        self.cross += other.cross
        self.map_total += other.map_total
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def map_covariance(self) -> np.ndarray:
        """(K,) covariance of each channel with the class's map over the descriptors: Cov(x, r)."""
        return self.cross / max(self.count, 1) - self.mean * (self.map_total / max(self.count, 1))

    def covariance(self) -> np.ndarray:
        """(K, K) population covariance of the descriptors."""
        m = self.mean
        return self.outer / max(self.count, 1) - np.outer(m, m)


@dataclasses.dataclass(frozen=True)
class Component:
    """What the projection needs for one class: mean (K,), unit direction (K,) with its sign fixed, the
    eigenvalue and the share of the total variance it explains."""

    mean: np.ndarray
    direction: np.ndarray
    eigenvalue: float
    explained: float


def principal_component(stats: ClassStats) -> Component:
    """The first principal component of a class's descriptors, signed so that the object is positive: the
    projection correlates positively with the class's CAM over the descriptors (see the module docstring).

    Args:
      stats: the class's statistics; needs at least two descriptors.

    Raises:
      ColocError: fewer than two descriptors, or descriptors that do not vary.
    """
    from scipy.sparse.linalg import ArpackError, eigsh

    if stats.count < 2:
        raise ColocError(f"a principal component needs at least 2 descriptors, got {stats.count}")
    cov = stats.covariance()
    trace = float(np.trace(cov))
    if not trace > 0:
        raise ColocError("the descriptors do not vary: no principal component")
    # Only the top eigenpair, by Lanczos (ARPACK): for K = 1280 about 10x faster than a dense eigh (measured
    # 2.7 s against 25 s on the loaded benchmark machine), which matters with one component per class. A fixed
    # start vector (each channel's spread) makes the result the same on every worker.
    start = np.sqrt(np.clip(np.diag(cov), 0.0, None)) + 1e-12
    try:
        vals, vecs = eigsh(cov, k=1, which="LA", v0=start, tol=1e-12)
    except (ArpackError, ValueError):  # ValueError: K too small for Lanczos
        vals, vecs = np.linalg.eigh(cov)
        vals, vecs = vals[-1:], vecs[:, -1:]
    top, v = float(vals[0]), vecs[:, 0]
    if not trace > 0 or not top > 0:
        raise ColocError("the descriptors do not vary: no principal component")
    if float(np.dot(v, stats.map_covariance())) < 0:
        v = -v
    return Component(stats.mean.astype(np.float32), v.astype(np.float32), top, top / trace)


def pooled_components(features: np.ndarray, keys: Sequence[Sequence[int]], class_maps: Sequence[np.ndarray]):
    """Per-class statistics and components of a stack of feature maps, as the Beam combine makes them.

    Args:
      features: float (N, h, w, K) feature maps.
      keys: for each map, the class ids its descriptors count for (once each).
      class_maps: for each map, float (len(keys[i]), h', w') the CAMs of those classes (any grid), which sign
        the components.

    Returns:
      [(class id, ClassStats, Component)] in increasing class id; a class whose descriptors have no component is
      left out (logged), its maps stay CAMs.
    """
    pools: dict[int, ClassStats] = {}
    for f, row, maps in zip(features, keys, class_maps):
        seen = set()
        for c, m in zip((int(c) for c in row), maps):
            if c not in seen:
                seen.add(c)
                pools.setdefault(c, ClassStats.zeros(f.shape[-1])).add(ClassStats.of(f, m))
    out = []
    for c in sorted(pools):
        try:
            out.append((c, pools[c], principal_component(pools[c])))
        except ColocError as exc:
            logger.warning("class %d: no co-localization component (%s); its maps stay CAMs", c, exc)
    return out


def project(features: np.ndarray, means: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Co-localization maps: P[b, m] = directions[b, m] . (features[b] - means[b, m]).

    Args:
      features: float (B, h, w, K) feature maps.
      means, directions: float (B, M, K), the component of each wanted class of each image.

    Returns:
      float32 (B, M, h, w), any sign (positive = the class's common object), not normalised.
    """
    f = np.asarray(features, np.float32)
    d = np.asarray(directions, np.float32)
    offset = np.einsum("bmk,bmk->bm", np.asarray(means, np.float32), d)
    return np.einsum("bhwk,bmk->bmhw", f, d) - offset[:, :, None, None]


def minmax(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each map of (..., h, w) min-max normalised to [0, 1] (boxes.normalize_cams, whatever the leading axes):
    (normed float32 (..., h, w), valid bool (...)); a constant or non-finite map is all zeros and not valid."""
    x = np.asarray(maps, np.float32)
    normed, valid = normalize_cams(x.reshape(-1, *x.shape[-2:]))
    return normed.reshape(x.shape), valid.reshape(x.shape[:-2])


def fuse(cams: np.ndarray, colocs: np.ndarray, mode: str = "mean") -> np.ndarray:
    """Fuse CAMs with co-localization maps of the same shape (..., h, w).

    Each map is min-max normalised first, so neither dominates by its units. "mean": (a + b) / 2, an object
    either map sees counts half; "product": sqrt(a b), a cell must be high in both (the geometric mean keeps
    the scale of a single map). Where one map is constant (no spatial evidence) the other is used alone.

    Returns:
      float32 (..., h, w) in [0, 1]; all zeros where both maps are constant.
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"fuse mode must be one of {FUSE_MODES}, got {mode!r}")
    a, va = minmax(cams)
    b, vb = minmax(colocs)
    if a.shape != b.shape:
        raise ValueError(f"cannot fuse maps of shapes {a.shape} and {b.shape}")
    both = np.sqrt(a * b) if mode == "product" else (a + b) / 2.0
    va, vb = va[..., None, None], vb[..., None, None]
    return np.where(va & vb, both, np.where(va, a, b)).astype(np.float32)


def colocalized(out, components: Mapping[int, Component], maps: str = "coloc", fuse_mode: str = "mean"):
    """A batch's CAMs replaced by co-localization maps (`maps` "coloc") or CAMs fused with them ("fused"), at the
    resolution of the features (finer than the CAMs' with `--coloc_layer`: the CAMs are resized onto it), for
    whatever then boxes CAMs (annotate.annotate_batch, calibration).

    Args:
      out: cam.CamOutputs with `features` (a CamModel built with features=True).
      components: {class id: Component}; a class without one keeps its CAM.

    Returns:
      (CamOutputs with low_res replaced and features dropped, how many maps were left as CAMs).
    """
    if out.features is None:
        raise ValueError("co-localization needs the feature maps: build the CamModel with features=True")
    n, m = out.cam_classes.shape
    k = out.features.shape[-1]
    classes = out.cam_classes.tolist()
    known = np.array([[c in components for c in row] for row in classes], bool).reshape(n, m)
    means = np.zeros((n, m, k), np.float32)
    dirs = np.zeros((n, m, k), np.float32)
    for b, row in enumerate(classes):
        for j, c in enumerate(row):
            if known[b, j]:
                means[b, j], dirs[b, j] = components[c].mean, components[c].direction
    projected = project(out.features, means, dirs)
    cams = out.low_res
    if cams.shape[2:] != projected.shape[2:]:  # features of a finer layer (--coloc_layer): CAMs onto their grid
        cams = upsample(cams.reshape(n * m, *cams.shape[2:]), projected.shape[2:]).reshape(n, m, *projected.shape[2:])
    if maps == "fused":
        projected = fuse(cams, projected, fuse_mode)
    elif maps != "coloc":
        raise ValueError(f"maps must be 'coloc' or 'fused', got {maps!r}")
    low = np.where(known[:, :, None, None], projected, cams).astype(np.float32)
    return dataclasses.replace(out, low_res=low, features=None), int((~known).sum())


# ---- the declared file format -------------------------------------------------------------------------------

def encode(stats: Mapping[int, ClassStats], components: Mapping[int, Component], *, class_names: Sequence[str],
           extractor: Mapping) -> tuple[bytes, dict]:
    """The bytes of `coloc_stats.npz` and the `coloc_stats.json` manifest that describes them.

    The npz holds, for the C classes in increasing class id: class_ids int64 (C,), images and count int64 (C,),
    total float64 (C, K), outer float64 (C, K, K), cross float64 (C, K), map_total float64 (C,), and each
    class's component: mean float32 (C, K), direction float32 (C, K), eigenvalue and explained float64 (C,). Classes without a component (too few descriptors)
    are left out. `extractor` describes how the features were made (model fingerprint, feature layer, K, TTA);
    `decode` refuses statistics made by another one.
    """
    ids = sorted(int(c) for c in components)
    if not ids:
        raise ColocError("no class has a principal component: nothing to save")
    k = len(components[ids[0]].mean)
    arrays = dict(
        class_ids=np.array(ids, np.int64),
        images=np.array([stats[c].images for c in ids], np.int64),
        count=np.array([stats[c].count for c in ids], np.int64),
        total=np.stack([stats[c].total for c in ids]),
        outer=np.stack([stats[c].outer for c in ids]),
        cross=np.stack([stats[c].cross for c in ids]),
        map_total=np.array([stats[c].map_total for c in ids], np.float64),
        mean=np.stack([components[c].mean for c in ids]).astype(np.float32),
        direction=np.stack([components[c].direction for c in ids]).astype(np.float32),
        eigenvalue=np.array([components[c].eigenvalue for c in ids], np.float64),
        explained=np.array([components[c].explained for c in ids], np.float64),
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "arrays": STATS_FILE,
        "channels": k,
        "extractor": dict(extractor),
        "classes": {class_names[c]: {"class_id": c, "images": int(stats[c].images), "descriptors": int(stats[c].count),
                                     "explained": float(components[c].explained)} for c in ids},
    }
    return buf.getvalue(), manifest


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Statistics read back: manifest dict, {class id: ClassStats}, {class id: Component}."""

    manifest: dict
    stats: dict
    components: dict


def check_manifest(manifest, where: str, *, class_names: Sequence[str] | None = None,
                   extractor: Mapping | None = None) -> None:
    """Raise ColocError unless `manifest` is this format and version, made by `extractor` (when given), with
    classes that are those of `class_names` (when given)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (manifest, None)
        raise ColocError(f"{where}: expected format {FORMAT!r} version {VERSION}, got {got[0]!r} version {got[1]}")
    if extractor is not None:
        made_by = manifest.get("extractor") or {}
        differ = {k: (made_by.get(k), v) for k, v in extractor.items() if made_by.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: file {a!r}, this run {b!r}" for k, (a, b) in differ.items())
            raise ColocError(f"{where} was made from other features ({what}); recompute them (drop --coloc_stats)")
    if class_names is not None:
        for name, entry in (manifest.get("classes") or {}).items():
            c = entry.get("class_id") if isinstance(entry, dict) else None
            if not isinstance(c, int) or not 0 <= c < len(class_names) or class_names[c] != name:
                raise ColocError(f"{where}: class {name!r} (id {c}) is not that class of the model")


def decode(manifest: dict, npz: bytes, where: str = "coloc stats", *, with_stats: bool = True, **check) -> Loaded:
    """Statistics from a manifest and its npz bytes (see `encode`); `check` goes to `check_manifest`.
    `with_stats=False` reads only the components (what a labelling run needs; the K x K sums are most of the
    file) and leaves `stats` empty."""
    check_manifest(manifest, where, **check)
    try:
        with np.load(io.BytesIO(npz)) as z:
            a = {k: z[k] for k in z.files if with_stats or k not in ("total", "outer", "cross")}
        ids = a["class_ids"].tolist()
        stats = {c: ClassStats(int(a["images"][i]), int(a["count"][i]), a["total"][i], a["outer"][i],
                               a["cross"][i], float(a["map_total"][i]))
                 for i, c in enumerate(ids)} if with_stats else {}
        comps = {c: Component(a["mean"][i], a["direction"][i], float(a["eigenvalue"][i]), float(a["explained"][i]))
                 for i, c in enumerate(ids)}
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ColocError(f"{where}: its arrays are not a weakloc statistics npz ({exc})") from None
    if comps and len(next(iter(comps.values())).mean) != manifest.get("channels"):
        raise ColocError(f"{where}: arrays have another channel count than the manifest's {manifest.get('channels')}")
    return Loaded(manifest, stats, comps)


# ---- on any Beam filesystem (models/files.py) ----------------------------------------------------------------

def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_stats(directory: str, triples, class_names: Sequence[str], extractor: Mapping) -> str:
    """Write [(class id, ClassStats, Component)] as `coloc_stats.npz` then its manifest; returns the manifest
    path. The manifest goes last, so a reader that finds it finds complete arrays."""
    stats = {c: s for c, s, _ in triples}
    comps = {c: p for c, _, p in triples}
    npz, manifest = encode(stats, comps, class_names=class_names, extractor=extractor)
    base = directory.rstrip("/")
    _write_bytes(FileSystems.join(base, STATS_FILE), npz)
    man = FileSystems.join(base, MANIFEST_FILE)
    _write_bytes(man, json.dumps(manifest, indent=2).encode())
    return man


def read_stats(path: str, *, with_stats: bool = True, **check) -> Loaded:
    """Statistics written by `write_stats`: `path` is their folder or the manifest (any Beam filesystem);
    `check` as `check_manifest` (class_names, extractor)."""
    man = path if path.endswith(".json") else FileSystems.join(path.rstrip("/"), MANIFEST_FILE)
    if not FileSystems.exists(man):
        raise ColocError(f"--coloc_stats {path}: no {MANIFEST_FILE} there")
    try:
        manifest = files.read_json(man, "--coloc_stats")
    except files.FileFormatError as exc:
        raise ColocError(str(exc)) from None
    check_manifest(manifest, f"--coloc_stats {man}", **check)
    npz = posixpath.join(posixpath.dirname(man), manifest.get("arrays", STATS_FILE))
    if not FileSystems.exists(npz):
        raise ColocError(f"--coloc_stats {man}: its arrays {npz} are missing")
    with FileSystems.open(npz, compression_type="uncompressed") as f:
        return decode(manifest, f.read(), f"--coloc_stats {man}", with_stats=with_stats)
