"""Pictures of a run: CAM overlays, boxes, contact sheets and histograms (Pillow and matplotlib's Agg canvas).

Plain image maths, no Beam and no files: callers get Pillow images or PNG bytes. Boxes follow weakloc's
convention (x0y0x1y1 in original pixels, continuous, max edge exclusive); CAMs are the low-resolution maps of the
`cams` column, which cover the whole picture (the model saw it resized, not cropped).
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

# Distinct, colour-blind-friendly box colours (Okabe-Ito), cycled by category index.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255))


def color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes as a viewer shows them (EXIF orientation applied, as `weakloc label` does), in RGB.

    Transparency goes over white like the pipeline's decoder; other modes convert directly (a preview only).
    """
    img = Image.open(io.BytesIO(data))
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, max_side: int, *, upscale: bool = False) -> tuple[Image.Image, float]:
    """Resize so the longer side is at most `max_side` (exactly `max_side` with `upscale`, so that small pictures
    such as 28x28 digits stay visible); returns (image, scale factor)."""
    scale = max_side / float(max(img.size))
    if not upscale:
        scale = min(1.0, scale)
    if scale != 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    return img, scale


def cam_overlay(img: Image.Image, cam: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """Blend a CAM, min-max normalised and stretched bilinearly over the whole picture, onto `img`.

    Args:
      img: RGB picture (any size).
      cam: float (h, w) raw CAM at feature-map resolution; a constant or non-finite map carries no location and
        leaves the picture unchanged.
      alpha: weight of the heat map.
    """
    from matplotlib import colormaps

    cam = np.asarray(cam, np.float32)
    finite = np.isfinite(cam)
    if not finite.any():
        return img.copy()
    lo, hi = float(cam[finite].min()), float(cam[finite].max())
    if hi <= lo:
        return img.copy()
    norm = np.where(finite, (cam - lo) / (hi - lo), 0.0).astype(np.float32)
    big = np.asarray(Image.fromarray(norm, mode="F").resize(img.size, Image.Resampling.BILINEAR))
    heat = (colormaps[cmap](np.clip(big, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    return Image.blend(img.convert("RGB"), Image.fromarray(heat, mode="RGB"), alpha)


def draw_boxes(img: Image.Image, boxes: Sequence[dict], *, scale: float = 1.0, width: int = 2,
               captions: bool = True) -> Image.Image:
    """Draw boxes given in original pixels onto a copy of `img` shown at `scale` x the original size.

    Each box is a dict with xmin, ymin, xmax, ymax, `color` (RGB) and optionally `caption`. The edges are drawn on
    the pixels the box covers: with max edge exclusive, the right edge is pixel column ceil(xmax * scale) - 1.
    """
    out = img.copy()
    draw = ImageDraw.Draw(out)
    placed: list[tuple[float, float, float, float]] = []  # caption rectangles already drawn
    for b in boxes:
        x0 = int(np.floor(b["xmin"] * scale))
        y0 = int(np.floor(b["ymin"] * scale))
        x1 = max(x0, int(np.ceil(b["xmax"] * scale)) - 1)
        y1 = max(y0, int(np.ceil(b["ymax"] * scale)) - 1)
        draw.rectangle((x0, y0, x1, y1), outline=tuple(b["color"]), width=width)
        if captions and b.get("caption"):
            text = str(b["caption"])
            tw = draw.textlength(text)
            tx = min(x0 + width, max(0, out.width - tw - 2))
            rect = caption_place((tx - 1, y0 - 11 if y0 >= 11 else y0 + width, tx + tw + 1), placed, out.height)
            placed.append(rect)
            draw.rectangle(rect, fill=(0, 0, 0))
            draw.text((rect[0] + 1, rect[1] - 1), text, fill=tuple(b["color"]))
    return out


CAPTION_H = 11  # pixels of one caption line (Pillow's default bitmap font, 10 high, plus a gap)


def caption_place(first: tuple[float, float, float], placed: Sequence[tuple[float, float, float, float]],
                  height: int) -> tuple[float, float, float, float]:
    """The caption rectangle (x0, y0, x1, y1) nearest its preferred row that overlaps no placed one.

    `first` = (x0, preferred top, x1). Tries the preferred row, then rows below it, then above, one caption height
    at a time; when the picture is full, the preferred row wins (overlap is then unavoidable).
    """
    x0, top, x1 = first
    rows = [top + k * CAPTION_H for k in range(0, height // CAPTION_H + 1)]
    rows += [top - k * CAPTION_H for k in range(1, height // CAPTION_H + 1)]
    for y in rows:
        if y < 0 or y + CAPTION_H - 1 > height:
            continue
        rect = (x0, y, x1, y + CAPTION_H - 1)
        if not any(rect[0] <= p[2] and p[0] <= rect[2] and rect[1] <= p[3] and p[1] <= rect[3] for p in placed):
            return rect
    return (x0, max(0, top), x1, max(0, top) + CAPTION_H - 1)


def strip(panels: Sequence[tuple[Image.Image, str]], *, gap: int = 4, background=(250, 250, 250)) -> Image.Image:
    """Pictures side by side, each with its label on a dark band at the top (one tile per CAM of a boxed class)."""
    if len(panels) == 1 and not panels[0][1]:
        return panels[0][0]
    h = max(p.height for p, _ in panels)
    w = sum(p.width for p, _ in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(out)
    x = 0
    for img, label in panels:
        out.paste(img, (x, 0))
        if label:
            tw = draw.textlength(label)
            draw.rectangle((x, 0, x + tw + 3, CAPTION_H), fill=(0, 0, 0))
            draw.text((x + 2, 0), label, fill=(255, 255, 255))
        x += img.width + gap
    return out


def placeholder(size: tuple[int, int], text: str) -> Image.Image:
    """A grey tile that says why there is no picture."""
    img = Image.new("RGB", size, (90, 90, 90))
    ImageDraw.Draw(img).multiline_text((6, 6), text, fill=(255, 255, 255))
    return img


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], *, columns: int = 6, tile: int = 160,
                  background=(24, 24, 24)) -> Image.Image:
    """A grid of (picture, caption) tiles, each picture fitted into `tile` x `tile` with its caption below."""
    columns = max(1, min(columns, len(tiles))) if tiles else 1
    rows = max(1, -(-len(tiles) // columns))
    caption_h = 14
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, rows * (tile + caption_h + 4) + 4), background)
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        r, c = divmod(i, columns)
        x, y = 4 + c * (tile + 4), 4 + r * (tile + caption_h + 4)
        small, _ = fit(img, tile, upscale=True)
        sheet.paste(small, (x + (tile - small.width) // 2, y + (tile - small.height) // 2))
        text = caption if draw.textlength(caption) <= tile else caption[: max(1, tile // 6 - 3)] + "..."
        draw.text((x, y + tile + 1), text, fill=(230, 230, 230))
    return sheet


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """Photos and their overlays: JPEG encodes some 20x faster than optimised PNG at a fraction of the size."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure(width: float = 5.0, height: float = 3.0):
    # A bare Figure on the Agg canvas: no pyplot, no global state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram_png(values: Sequence[float], *, title: str, xlabel: str, bins: int = 20,
                  value_range: Optional[tuple[float, float]] = (0.0, 1.0)) -> bytes:
    """PNG bytes of a histogram (an empty one says "no values")."""
    fig = _figure()
    ax = fig.add_subplot()
    vals = np.asarray(list(values), np.float64)
    if len(vals):
        ax.hist(vals, bins=bins, range=value_range, color="#0072b2", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} (n={len(vals)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _fig_png(fig)


def bar_png(labels: Sequence[str], counts: Sequence[int], *, title: str) -> bytes:
    """PNG bytes of a horizontal bar chart (per-class counts)."""
    fig = _figure(5.0, max(2.0, 0.35 * len(labels) + 1.0))
    ax = fig.add_subplot()
    ax.barh(list(range(len(labels))), list(counts), color=[np.array(color(i)) / 255 for i in range(len(labels))],
            edgecolor="#333333")
    ax.set_yticks(list(range(len(labels))), list(labels))
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("boxes")
    return _fig_png(fig)
