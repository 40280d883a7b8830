"""`weakloc report`: a static HTML page to look at a labelling run, plus a PNG contact sheet.

    weakloc report --annotations weak_labels/2026-11-25 --output report/

The page opens from disk with no server and no network (every picture is a file beside it, and its
Content-Security-Policy forbids anything else): a sample of images per class with the CAM overlay (when the run
was labelled with --emit_cams) and the boxes, per-class counts, score and box-size histograms, the failures
table and the run summary.
"""
from __future__ import annotations

import argparse
import collections
import html
import json
import logging
import os
import random
import time
from typing import Optional


from weakloc.models import visualize as viz
from weakloc.models.export import safe_stem

from . import results, sources
from .options import OptionsError
from .args import Parser

logger = logging.getLogger(__name__)

NO_BOX = "(no box)"
# The page may show its own files and run its own inline script; nothing else, so it can never reach a network.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

# Counts broken pictures and load errors, marks them on the page, and leaves the numbers on <body> (the tests read
# them through a headless browser).
CHECK_SCRIPT = """
var weaklocErrors = 0;
window.addEventListener('error', function () { weaklocErrors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken += 1; imgs[i].className += ' broken'; }
  }
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-broken', String(broken));
  document.body.setAttribute('data-errors', String(weaklocErrors));
  if (broken) {
    var note = document.getElementById('broken-note');
    note.textContent = broken + ' of ' + imgs.length + ' pictures failed to load: is the report folder complete?';
    note.hidden = false;
  }
});
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin-top: 0; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .2em .5em; }
th { background: #eee; text-align: left; } td.num { text-align: right; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; width: 264px; }
figure img { max-width: 256px; border: 1px solid #999; display: block; }
figcaption { font-size: 12px; word-break: break-all; }
.note { background: #fff3cd; border: 1px solid #e0c36b; padding: .5em .8em; }
.broken { outline: 3px solid red; } pre { background: #f0f0f0; padding: .8em; overflow-x: auto; }
.plots img { margin-right: 10px; border: 1px solid #ddd; }
"""


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc report", description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", required=True, help="a `weakloc label` --output folder (local, gs://, s3://)")
    ap.add_argument("--output", required=True, help="local folder for index.html, its pictures and the sheet")
    ap.add_argument("--per_class", type=int, default=6, help="sampled images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-class sample")
    ap.add_argument("--max_side", type=int, default=256, help="longest side of a thumbnail, in pixels")
    ap.add_argument("--max_failures", type=int, default=200, help="failure rows listed (all are counted)")
    ap.add_argument("--overwrite", action="store_true", help="write into a folder that holds an earlier report")
    return ap


def sample_per_class(rows: list[dict], per_class: int, seed: int) -> dict[str, list[dict]]:
    """class label -> up to `per_class` rows whose boxes include it (seeded, so a report is reproducible);
    rows without a box gather under NO_BOX."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in sorted(rows, key=lambda r: r["image_id"]):
        labels = dict.fromkeys(b["label"] for b in r["boxes"] or []) or {NO_BOX: None}
        for lbl in labels:
            groups[lbl].append(r)
    rng = random.Random(seed)
    return {k: (v if len(v) <= per_class else rng.sample(v, per_class)) for k, v in sorted(groups.items())}


def _cam_for(row: dict, class_id: int):
    import numpy as np

    for c in row.get("cams") or []:
        if c["class_id"] == class_id:
            return np.asarray(c["values"], np.float32).reshape(c["height"], c["width"])
    return None


def _tile(row: dict, label: str, data: Optional[bytes], why: Optional[str], class_index: dict, max_side: int):
    """The picture of one sampled (row, class): CAM overlay of that class if known, then all boxes."""
    if data is None:
        return viz.placeholder((max_side, max_side * 3 // 4), f"image unavailable\n{(why or '')[:200]}"), False
    try:
        img = viz.open_rgb(data)
    except Exception as exc:
        return viz.placeholder((max_side, max_side * 3 // 4), f"cannot decode: {type(exc).__name__}"), False
    # The picture may differ in size from the row (a replaced file): scale boxes by the row's own size.
    small, _ = viz.fit(img, max_side, upscale=True)
    scale = small.width / float(row["width"] or small.width)
    shown = next((b for b in row["boxes"] or [] if b["label"] == label), None)
    overlaid = False
    if shown is not None:
        cam = _cam_for(row, shown["class_id"])
        if cam is not None:
            small, overlaid = viz.cam_overlay(small, cam), True
    # Boxes the input carried (ground truth) in thin white under the weak boxes, for comparison by eye.
    truth = [dict(g, color=(255, 255, 255)) for g in row.get("gt_boxes") or []]
    boxes = [dict(b, color=viz.color(class_index.get(b["label"], 0)), caption=f"{b['label']} {b['score']:.2f}")
             for b in row["boxes"] or []]
    small = viz.draw_boxes(small, truth, scale=scale, width=1, captions=False)
    return viz.draw_boxes(small, boxes, scale=scale), overlaid


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{html.escape(str(v))}</td>" if i in numeric
                         else f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(r)) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str, alt: str, width: Optional[int] = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{w}>'


def run(argv: Optional[list[str]] = None) -> dict:
    """Write the report; returns what it wrote (paths relative to --output) and what it showed."""
    args = parser().parse_args(argv)
    t0 = time.time()
    if args.per_class < 1 or args.max_side < 16:
        raise OptionsError("--per_class must be >= 1 and --max_side >= 16")
    if "://" in args.output:
        raise OptionsError(f"--output must be a local folder (the page is opened from disk), got {args.output}")
    out = os.path.abspath(args.output)
    if os.path.exists(os.path.join(out, "index.html")) and not args.overwrite:
        raise OptionsError(f"--output {out} already holds a report (index.html); pass --overwrite or choose a "
                           "new folder")
    results.check_run_folder(args.annotations)
    table = results.read_table(args.annotations, "annotations")
    failures = results.read_table(args.annotations, "failures").to_pylist()
    try:
        summary = results.read_summary(args.annotations)
    except Exception:
        summary = {}
    if table.num_rows == 0 and not failures and not summary:
        raise OptionsError(f"--annotations {args.annotations} holds no annotations, failures or summary.json")
    has_cams = "cams" in table.column_names
    # CAMs are most of the table's bytes: only the sampled rows' maps are turned into Python objects.
    rows = table.drop_columns(["cams"]).to_pylist() if has_cams else table.to_pylist()
    for i, r in enumerate(rows):
        r["_row"] = i
    os.makedirs(os.path.join(out, "images"), exist_ok=True)

    class_names = list(summary.get("model", {}).get("class_names") or
                       sorted({b["label"] for r in rows for b in r["boxes"] or []}))
    class_index = {n: i for i, n in enumerate(class_names)}
    boxes = [b for r in rows for b in r["boxes"] or []]
    per_class = collections.Counter(b["label"] for b in boxes)
    images_per_class = collections.Counter(lbl for r in rows for lbl in {b["label"] for b in r["boxes"] or []})

    # Pictures: each sampled image is read once, whatever the number of classes it is shown under.
    sample = sample_per_class(rows, args.per_class, args.seed)
    needed = {r["source"] for group in sample.values() for r in group}
    fetched = {s: (data, why) for s, data, why in sources.iter_image_bytes(sorted(needed))}
    if has_cams:
        cams = table.column("cams")
        for group in sample.values():
            for r in group:
                r.setdefault("cams", cams[r["_row"]].as_py())
    tiles, sections, unavailable, overlays = [], [], 0, 0
    for label, group in sample.items():
        figures = []
        for r in group:
            data, why = fetched.get(r["source"], (None, "not read"))
            unavailable += data is None
            pic, overlaid = _tile(r, label, data, why, class_index, args.max_side)
            overlays += overlaid
            name = f"images/{safe_stem(r['image_id'])}-{safe_stem(label)}.png"
            with open(os.path.join(out, name), "wb") as f:
                f.write(viz.png_bytes(pic))
            tiles.append((pic, f"{label}: {r['image_id']}"))
            scores = ", ".join(f"{b['label']} {b['score']:.2f}" for b in r["boxes"] or []) or "no box"
            figures.append(f"<figure>{_img(name, r['image_id'])}<figcaption><b>{html.escape(r['image_id'])}</b>"
                           f"<br>{r['width']}x{r['height']} · {html.escape(scores)}"
                           f"{' · CAM overlay' if overlaid else ''}</figcaption></figure>")
        count = per_class.get(label, sum(1 for r in rows if not r["boxes"]))
        sections.append(f"<h3>{html.escape(label)} <small>({len(group)} of {images_per_class.get(label, count)} "
                        f"images)</small></h3><div class=\"grid\">{''.join(figures)}</div>")

    sheet = viz.contact_sheet(tiles) if tiles else viz.placeholder((320, 80), "no images")
    sheet.save(os.path.join(out, "contact_sheet.png"))
    plots = {
        "score_hist.png": viz.histogram_png([b["score"] for b in boxes], title="Class probability of boxes",
                                            xlabel="score"),
        "cam_score_hist.png": viz.histogram_png([b["cam_score"] for b in boxes], title="Mean normalised CAM in box",
                                                xlabel="cam_score"),
        "box_area_hist.png": viz.histogram_png(
            [(b["xmax"] - b["xmin"]) * (b["ymax"] - b["ymin"]) / float(r["width"] * r["height"])
             for r in rows for b in r["boxes"] or [] if r["width"] and r["height"]],
            title="Box area", xlabel="fraction of the image"),
        "class_counts.png": viz.bar_png(class_names, [per_class.get(n, 0) for n in class_names],
                                        title="Boxes per class"),
    }
    for name, data in plots.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    counts = summary.get("counts", {})
    cam_note = ("CAM overlays come from the run's <code>cams</code> column." if has_cams else
                "<b>This run has no CAMs</b> (it was labelled without <code>--emit_cams</code>): pictures show "
                "the boxes only. Label with <code>--emit_cams</code> to see the heat maps.")
    missing_note = (f"<p class=\"note\">{unavailable} sampled pictures could not be read from their source and show "
                    "a grey tile instead.</p>" if unavailable else "")
    class_rows = [[n, per_class.get(n, 0), images_per_class.get(n, 0)] for n in class_names]
    class_rows += [[n, c, images_per_class[n]] for n, c in sorted(per_class.items()) if n not in class_index]
    by_stage = collections.Counter((f["stage"], f["error"]) for f in failures)
    fail_rows = [[f["stage"], f["error"], f["image_id"] or "", f["source"], f["message"]]
                 for f in failures[: args.max_failures]]
    overview = [["images read", counts.get("read", "?")], ["annotated", counts.get("annotated", len(rows))],
                ["failed", counts.get("failed", len(failures))], ["balanced", counts.get("balanced", "?")],
                ["boxes", len(boxes)], ["images without a box", sum(1 for r in rows if not r["boxes"])],
                ["model", summary.get("model", {}).get("name") or (rows[0]["model"] if rows else "?")]]
    gt_note = "; thin white boxes are those the input carried (ground truth)" if any(
        r["gt_boxes"] for r in rows) else ""
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    plots_html = "".join(_img(name, alt) for name, alt in (
        ("score_hist.png", "score histogram"), ("cam_score_hist.png", "CAM score histogram"),
        ("box_area_hist.png", "box area histogram")))
    if failures:
        failures_html = (_table(["stage", "error", "failures"], [[s, e, n] for (s, e), n in by_stage.most_common()],
                                {2})
                         + _table(["stage", "error", "image id", "source", "message"], fail_rows))
        if len(failures) > args.max_failures:
            failures_html += f"<p>First {args.max_failures} of {len(failures)} listed.</p>"
    else:
        failures_html = "<p>None.</p>"
    summary_html = html.escape(json.dumps(summary, indent=2, sort_keys=True)) if summary else \
        "No summary.json in the run folder."
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>weakloc report: {html.escape(args.annotations)}</title>
<style>{STYLE}</style>
<script>{CHECK_SCRIPT}</script>
</head><body>
<h1>weakloc report</h1>
<p>Run: <code>{html.escape(args.annotations)}</code>. Written {written}.</p>
<p id="broken-note" class="note" hidden></p>
{_table(["", "value"], overview)}
<h2>Boxes per class</h2>
{_table(["class", "boxes", "images"], class_rows, {1, 2})}
<div class="plots">{_img("class_counts.png", "boxes per class")}</div>
<h2>Scores and box sizes</h2>
<div class="plots">{plots_html}</div>
<h2>A sample of images per class</h2>
<p class="note">{cam_note} Boxes of every class are drawn, coloured by class, with the class probability{gt_note}.
Up to {args.per_class} images per class, sampled with seed {args.seed}.</p>
{missing_note}
{''.join(sections) or '<p>No annotated images.</p>'}
<h2>Failures ({len(failures)})</h2>
{failures_html}
<h2>Contact sheet</h2>
<p><a href="contact_sheet.png">contact_sheet.png</a> (every sampled picture on one PNG)</p>
{_img("contact_sheet.png", "contact sheet", width=960)}
<h2>Run summary</h2>
<pre>{summary_html}</pre>
</body></html>
"""
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    info = {"index": os.path.join(out, "index.html"), "contact_sheet": os.path.join(out, "contact_sheet.png"),
            "classes_shown": list(sample), "pictures": len(tiles), "cam_overlays": overlays,
            "unavailable": unavailable, "has_cams": has_cams, "seconds": round(time.time() - t0, 2)}
    logger.info("report: %s (%d pictures, %d with a CAM overlay)", info["index"], len(tiles), overlays)
    return info
