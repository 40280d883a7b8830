"""A small self-trained, class-agnostic box regressor (the PSOL idea, Zhang et al., CVPR 2020): plain numpy.

Pass 1 boxes the images with the calibrated CAM method; the confident pseudo-boxes (top class score and box score
both at or above a quantile) train a ridge regression from the backbone's pooled feature map to the box; pass 2
replaces (or averages with) every CAM box by the regressed one. The regression sees features only, never a true
box: it learns what the confident boxes share and carries it to the doubtful images. Fitted and saved by
`weakloc calibrate` (an `.npz` beside the thresholds file, as the co-localization statistics are), applied by
`label` in its one forward pass.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np

FORMAT = "weakloc.box_regressor"
VERSION = 1
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge penalties tried, per standardised descriptor column
CONFIDENT_QUANTILE = 0.5  # a pseudo-box is kept when both its scores are at or above this quantile of theirs
MIN_SAMPLES = 8  # fewer confident pseudo-boxes than this: no regression is fitted


class RegressorError(ValueError):
    """A regressor that cannot be fitted (too few samples) or a file that is not one."""


def descriptors(features: np.ndarray, grid: int = 1) -> np.ndarray:
    """Each feature map average-pooled on a grid x grid layout and flattened.

    Args:
      features: float (N, h, w, K) feature maps (h, w >= grid).
      grid: 1 is the GAP vector; 3 keeps where things are (3 x 3 x K).

    Returns:
      float32 (N, grid * grid * K), cells in row-major order, channels last.
    """
    f = np.asarray(features, np.float32)
    if f.ndim != 4:
        raise ValueError(f"descriptors expect feature maps (N, h, w, K), got shape {f.shape}")
    n, h, w, k = f.shape
    if grid < 1 or h < grid or w < grid:
        raise ValueError(f"a {grid} x {grid} pooling grid needs maps of at least that size, got {h} x {w}")
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    cells = [f[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(axis=(1, 2)) for i in range(grid) for j in range(grid)]
    return np.concatenate(cells, axis=1).reshape(n, grid * grid * k)


def confident(top_scores: np.ndarray, box_scores: np.ndarray, has_box: np.ndarray,
              quantile: float = CONFIDENT_QUANTILE) -> np.ndarray:
    """bool (N,): maps with a box whose class score and box score are both >= their `quantile` over those maps."""
    has_box = np.asarray(has_box, bool)
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be within [0, 1), got {quantile}")
    if not has_box.any():
        return has_box
    t = np.quantile(np.asarray(top_scores)[has_box], quantile)
    b = np.quantile(np.asarray(box_scores)[has_box], quantile)
    return has_box & (np.asarray(top_scores) >= t) & (np.asarray(box_scores) >= b)


@dataclasses.dataclass(frozen=True, eq=False)
class BoxRegressor:
    """Ridge regression from standardised descriptors to normalised boxes.

    mean, scale: float32 (D,) the descriptors' standardisation; weights float32 (D, 4); bias float32 (4,);
    grid: the pooling grid of `descriptors`; alpha: the ridge penalty chosen; samples: how many boxes it was
    fitted on. Boxes are x0y0x1y1 normalised to [0, 1] of the model input (max edge exclusive).
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    grid: int = 1
    alpha: float = 1.0
    samples: int = 0

    def predict(self, desc: np.ndarray) -> np.ndarray:
        """float32 (N, 4) normalised boxes of descriptors (N, D), clipped to [0, 1] and ordered (x0 <= x1)."""
        d = np.asarray(desc, np.float32)
        if d.ndim != 2 or d.shape[1] != len(self.mean):
            raise RegressorError(f"the regressor expects descriptors (N, {len(self.mean)}), got {d.shape}: made "
                                 "from other features than it was fitted on")
        out = np.clip(((d - self.mean) / self.scale) @ self.weights + self.bias, 0.0, 1.0)
        lo = np.minimum(out[:, :2], out[:, 2:])
        hi = np.maximum(out[:, :2], out[:, 2:])
        return np.concatenate([lo, hi], axis=1).astype(np.float32)

    def boxes(self, features: np.ndarray) -> np.ndarray:
        """float32 (N, 4) normalised boxes of feature maps (N, h, w, K)."""
        return self.predict(descriptors(features, self.grid))

    # ---- the declared file: one .npz of arrays, its metadata as 0-d arrays ----
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, format=np.array(FORMAT), version=np.array(VERSION), mean=self.mean, scale=self.scale,
                 weights=self.weights, bias=self.bias, grid=np.array(self.grid), alpha=np.array(self.alpha),
                 samples=np.array(self.samples))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "regressor") -> "BoxRegressor":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise RegressorError(f"{where} is not an npz file ({exc})") from None
        if str(a.get("format")) != FORMAT or int(a.get("version", -1)) != VERSION:
            raise RegressorError(f"{where}: expected format {FORMAT!r} version {VERSION}, got "
                                 f"{a.get('format')!r} version {a.get('version')}")
        try:
            out = cls(a["mean"].astype(np.float32), a["scale"].astype(np.float32), a["weights"].astype(np.float32),
                      a["bias"].astype(np.float32), int(a["grid"]), float(a["alpha"]), int(a["samples"]))
        except KeyError as exc:
            raise RegressorError(f"{where}: missing array {exc}") from None
        d = len(out.mean)
        if out.scale.shape != (d,) or out.weights.shape != (d, 4) or out.bias.shape != (4,):
            raise RegressorError(f"{where}: arrays of inconsistent shapes (mean {out.mean.shape}, scale "
                                 f"{out.scale.shape}, weights {out.weights.shape}, bias {out.bias.shape})")
        return out


def _ridge_dual(x: np.ndarray, y: np.ndarray, alphas) -> tuple[np.ndarray, float, np.ndarray]:
    """Ridge weights of centred x (N, D) and y (N, 4) for the penalty (of `alphas`) with the least
    leave-one-out squared error, read off the closed form (hat-matrix residuals) of one eigen-solve of x x'.
    The dual form costs N^3 whatever D is (descriptors are wide, pseudo-boxes a few hundred).
    Returns (weights (D, 4), alpha, leave-one-out mean squared error per alpha)."""
    gram = x @ x.T
    vals, vecs = np.linalg.eigh(gram.astype(np.float64))
    vals = np.clip(vals, 0.0, None)
    uy = vecs.T @ y
    errors = []
    for a in alphas:
        shrink = vals / (vals + a)
        fitted = vecs @ (shrink[:, None] * uy)
        hat = (vecs ** 2) @ shrink  # diagonal of the hat matrix
        loo = (y - fitted) / np.maximum(1.0 - hat, 1e-9)[:, None]
        errors.append(float((loo ** 2).mean()))
    best = int(np.argmin(errors))
    a = alphas[best]
    dual = vecs @ (uy / (vals + a)[:, None])  # (N, 4): w = x' (x x' + a I)^-1 y
    return (x.T @ dual).astype(np.float32), float(a), np.array(errors)


def fit(desc: np.ndarray, boxes: np.ndarray, *, grid: int = 1, alphas=ALPHAS) -> BoxRegressor:
    """Fit the regression of normalised boxes (N, 4) on descriptors (N, D) (`descriptors` of the same grid).

    The penalty is chosen among `alphas` (scaled by the number of columns, so it means the same for a GAP vector
    and a 3 x 3 grid) by leave-one-out error on these samples. A column that does not vary is left out (scale 1).

    Raises:
      RegressorError: fewer than MIN_SAMPLES samples, or shapes that do not match.
    """
    x = np.asarray(desc, np.float64)
    y = np.asarray(boxes, np.float64)
    if x.ndim != 2 or y.shape != (len(x), 4):
        raise RegressorError(f"fit expects descriptors (N, D) and boxes (N, 4), got {x.shape} and {y.shape}")
    if len(x) < MIN_SAMPLES:
        raise RegressorError(f"a box regression needs at least {MIN_SAMPLES} confident pseudo-boxes, got {len(x)}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    xs = (x - mean) / scale
    bias = y.mean(axis=0)
    d = x.shape[1]
    weights, alpha, _ = _ridge_dual(xs, y - bias, [a * d / 100.0 for a in alphas])
    return BoxRegressor(mean.astype(np.float32), scale.astype(np.float32), weights, bias.astype(np.float32),
                        grid=grid, alpha=alpha, samples=len(x))
