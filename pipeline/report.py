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
import json
import logging
import os
import random
import time
from typing import Optional


from apache_beam.io.filesystems import FileSystems

from weakloc.models import metrics
from weakloc.models import visualize as viz
from weakloc.models.export import common_root, relative_id, safe_stem

from . import ground_truth, progress, results, sources
from .options import OptionsError
from .args import Parser, annotations_flag, ground_truth_flag

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
  var tops = [], heads = document.querySelectorAll('h2[id]');
  for (var j = 0; j < heads.length; j++) {
    tops.push(heads[j].id + ':' + Math.round(heads[j].getBoundingClientRect().top + window.scrollY));
  }
  document.body.setAttribute('data-section-tops', tops.join(','));
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
.grid { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; max-width: 660px; }
figure img { border: 1px solid #999; display: block; cursor: zoom-in; }
figcaption { font-size: 12px; word-break: break-word; max-width: 330px; }
details summary { cursor: pointer; font-weight: bold; }
.note { background: #fff3cd; border: 1px solid #e0c36b; padding: .5em .8em; }
.broken { outline: 3px solid red; } pre { background: #f0f0f0; padding: .8em; overflow-x: auto; }
.plots img { margin-right: 10px; border: 1px solid #ddd; }
"""


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc report", description=__doc__.splitlines()[0], parents=[
        annotations_flag(), ground_truth_flag("true boxes to draw and score the run against",
                                              "the boxes the inputs carried, and the figures of the run's evaluation.json if any")])
    ap.add_argument("--output", required=True, help="local folder for index.html, its pictures and the sheet")
    ap.add_argument("--per_class", type=int, default=6, help="sampled images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-class sample")
    ap.add_argument("--max_side", type=int, default=320, help="longest side of a thumbnail, in pixels")
    ap.add_argument("--zoom_side", type=int, default=960, help="longest side of the picture a click opens")
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
    """The picture of one sampled (row, class): CAM overlay of that class if known, the true boxes (thin white) and
    every weak box; beside it, at half size, the CAM of each other boxed class with that class's boxes.

    Returns (picture, whether a CAM was overlaid, panels beside the main one)."""
    if data is None:
        return viz.placeholder((max_side, max_side * 3 // 4), f"image unavailable\n{(why or '')[:200]}"), False, 0
    try:
        img = viz.open_rgb(data)
    except Exception as exc:
        return viz.placeholder((max_side, max_side * 3 // 4), f"cannot decode: {type(exc).__name__}"), False, 0
    # The picture may differ in size from the row (a replaced file): scale boxes by the row's own size.
    small, _ = viz.fit(img, max_side, upscale=True)
    scale = small.width / float(row["width"] or small.width)
    shown = next((b for b in row["boxes"] or [] if b["label"] == label), None)
    overlaid = False
    if shown is not None:
        cam = _cam_for(row, shown["class_id"])
        if cam is not None:
            small, overlaid = viz.cam_overlay(small, cam), True
    truth = [dict(g, color=(255, 255, 255)) for g in row.get("gt_boxes") or []]

    def weak(boxes):
        return [dict(b, color=viz.color(class_index.get(b["label"], 0)), caption=f"{b['label']} {b['score']:.2f}")
                for b in boxes]

    main = viz.draw_boxes(viz.draw_boxes(small, truth, scale=scale, width=1, captions=False), weak(row["boxes"] or []),
                          scale=scale)
    panels = [(main, "")]
    others = dict.fromkeys(b["class_id"] for b in row["boxes"] or [] if b["label"] != label)
    half, _ = viz.fit(img, max(16, max_side // 2), upscale=True)
    for cid in others:
        cam = _cam_for(row, cid)
        if cam is None:
            continue
        mine = [b for b in row["boxes"] if b["class_id"] == cid]
        panel = viz.draw_boxes(viz.cam_overlay(half, cam), weak(mine), scale=half.width / float(row["width"] or 1))
        panels.append((panel, f"CAM {mine[0]['label']}"))
    return (viz.strip(panels) if len(panels) > 1 else main), overlaid, len(panels) - 1


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html")


def short_captions(rows: list[dict]) -> dict[str, str]:
    """image id -> a short caption: image files relative to the folder all the run's files share (as export names
    them), record ids as they are; anything over 48 characters keeps its tail."""
    root = common_root([(r["image_id"], r["source"]) for r in rows])
    out = {}
    for r in rows:
        text = relative_id(r["image_id"], root)
        out[r["image_id"]] = text if len(text) <= 48 else "..." + text[-45:]
    return out


def attach_truth(rows: list[dict], specs, class_names) -> int:
    """--ground_truth: each row's true boxes from VOC/COCO/TFRecords (as evaluate does); returns rows matched."""
    for r in rows:
        r["gt_boxes"] = []
    matched = ground_truth.attach_to_rows(rows, ground_truth.load(specs, class_names), class_names)
    if not matched:
        raise OptionsError(f"--ground_truth {specs} knows none of the {len(rows)} annotated images (matched by "
                           "image id, file name and file stem)")
    return matched


def evaluation_view(rows: list[dict], class_names, source: str, annotations: str, label_options: dict):
    """The evaluation table shown on the page: from the rows' true boxes, else the run's evaluation.json."""
    known = [dict(r, gt_boxes=[g for g in r["gt_boxes"] or [] if g["class_id"] >= 0]) for r in rows]
    try:
        ev = metrics.evaluate_rows(known, class_names)
    except ValueError:
        ev = _read_evaluation(annotations)
        if ev is None:
            return None
        source = f"{annotations}/evaluation.json"
        ev = {k: ({float(a): b for a, b in v.items()} if isinstance(v, dict) and k in ("gt_known", "top1_loc")
                  else v) for k, v in ev.items()}
        for base in ev.get("baselines", {}).values():
            base["gt_known"] = {float(a): b for a, b in base["gt_known"].items()}
        for pc in ev.get("per_class", {}).values():
            pc["corloc"] = {float(a): b for a, b in pc["corloc"].items()}
    levels = sorted(ev["gt_known"])
    pct = "{:.1%}".format
    rows_out = [["GT-known Loc (weakloc)", *(pct(ev["gt_known"][lv]) for lv in levels)],
                ["Top-1 Loc (weakloc)", *(pct(ev["top1_loc"][lv]) for lv in levels)],
                ["GT-known Loc, full-image box", *(pct(ev["baselines"]["full_image"]["gt_known"][lv]) for lv in levels)],
                ["GT-known Loc, centred median box",
                 *(pct(ev["baselines"]["centred_median"]["gt_known"][lv]) for lv in levels)]]
    class_rows = [[n, pc["pairs"], *(pct(pc["corloc"][lv]) for lv in levels), f"{pc['mean_iou']:.3f}"]
                  for n, pc in ev["per_class"].items()]
    from .evaluate import same_as_top1_note

    return {"source": source, "images": ev["images"], "pairs": ev["pairs"], "top1": pct(ev["top1"]),
            "header": ["", *(f"IoU >= {lv:g}" for lv in levels)], "rows": rows_out,
            "numeric": tuple(range(1, len(levels) + 1)),
            "class_header": ["class", "pairs", *(f"CorLoc @{lv:g}" for lv in levels), "mean IoU"],
            "class_rows": class_rows, "class_numeric": tuple(range(1, len(levels) + 3)),
            "note": same_as_top1_note(dict(ev, label_options=label_options))}


def _read_evaluation(annotations: str):
    path = FileSystems.join(annotations.rstrip("/"), "evaluation.json")
    try:
        if FileSystems.exists(path):
            with FileSystems.open(path) as f:
                return json.loads(f.read().decode("utf-8"))
    except Exception as exc:
        logger.warning("cannot read %s: %s", path, exc)
    return None


def ranked_views(rows: list[dict], per_section: int) -> list[tuple[str, str, str, list[dict], int]]:
    """(anchor, title, note, rows, total) of the sorted sections: worst IoU and misclassified (with true boxes),
    lowest score (always)."""
    out = []
    judged = [r for r in rows if r.get("_iou")]
    if judged:
        worst = sorted(judged, key=lambda r: (min(r["_iou"].values()), r["image_id"]))
        out.append(("worst-iou", "Worst IoU", "Images whose weakloc box overlaps its true box least (the lowest IoU "
                    "over the image's true classes), worst first.", worst[:per_section], len(worst)))
        wrong = [r for r in judged if (r["classes"][0]["class_id"] if r.get("classes") else -1) not in r["_iou"]]
        wrong.sort(key=lambda r: (-(r["classes"][0]["score"] if r.get("classes") else 0.0), r["image_id"]))
        out.append(("misclassified", "Misclassified", "Images whose top-1 class is none of their true classes, most "
                    "confident first.", wrong[:per_section], len(wrong)))
    scored = [r for r in rows if r["boxes"]]
    scored.sort(key=lambda r: (max(b["score"] for b in r["boxes"]), r["image_id"]))
    out.append(("lowest-score", "Lowest score", "Images whose best box has the lowest class probability, lowest "
                "first.", scored[:per_section], len(scored)))
    return out


def run(argv: Optional[list[str]] = None) -> dict:
    """Write the report; returns what it wrote (paths relative to --output) and what it showed."""
    args = parser().parse_args(argv)
    t0 = time.time()
    out = _check_args(args)
    table, failures, summary = _read_run(args.annotations)
    has_cams = "cams" in table.column_names
    # CAMs are most of the table's bytes: only the sampled rows' maps are turned into Python objects.
    rows = table.drop_columns(["cams"]).to_pylist() if has_cams else table.to_pylist()
    for i, r in enumerate(rows):
        r["_row"] = i
    os.makedirs(os.path.join(out, "images"), exist_ok=True)

    class_names = list(summary.get("model", {}).get("class_names") or
                       sorted({b["label"] for r in rows for b in r["boxes"] or []}))
    class_index = {n: i for i, n in enumerate(class_names)}
    truth_source = "the true boxes the inputs carried"
    if args.ground_truth:
        attach_truth(rows, args.ground_truth, class_names)
        truth_source = ", ".join(args.ground_truth)
    for r in rows:
        r["_iou"] = metrics.image_ious(dict(r, gt_boxes=[g for g in r["gt_boxes"] or [] if g["class_id"] >= 0]))
    has_truth = any(r["gt_boxes"] for r in rows)
    evaluation = evaluation_view(rows, class_names, truth_source, args.annotations, summary.get("options", {}))
    boxes = [b for r in rows for b in r["boxes"] or []]
    per_class = collections.Counter(b["label"] for b in boxes)
    images_per_class = collections.Counter(lbl for r in rows for lbl in {b["label"] for b in r["boxes"] or []})
    captions = short_captions(rows)

    # Pictures: each sampled image is read once, whatever the number of sections it is shown in.
    sample = sample_per_class(rows, args.per_class, args.seed)
    ranked = ranked_views(rows, args.per_class)
    needed = {r["source"] for group in sample.values() for r in group} | {r["source"] for v in ranked for r in v[3]}
    fetched = {s: (data, why) for s, data, why in
               sources.iter_image_bytes(progress.counted(sorted(needed), len(needed), "report: pictures read"))}
    if has_cams:
        cams = table.column("cams")
        for r in rows:
            if r["source"] in needed:
                r.setdefault("cams", cams[r["_row"]].as_py())
    tiles, counters = [], {"unavailable": 0, "overlays": 0}

    def figure(r, label, prefix):
        data, why = fetched.get(r["source"], (None, "not read"))
        counters["unavailable"] += data is None
        pic, overlaid, extra = _tile(r, label, data, why, class_index, args.zoom_side)
        counters["overlays"] += overlaid
        stem = f"{prefix}{safe_stem(r['image_id'])}-{safe_stem(label)}"
        # The main picture keeps --max_side however many CAM panels sit beside it (each half as large).
        thumb, _ = viz.fit(pic, round(args.max_side * (1 + 0.5 * extra)), upscale=True)
        for name, img in ((f"images/{stem}.jpg", thumb), (f"images/{stem}-zoom.jpg", pic)):
            with open(os.path.join(out, name), "wb") as f:
                f.write(viz.jpeg_bytes(img))
        if not prefix:
            tiles.append((thumb, f"{label}: {captions[r['image_id']]}"))
        scores = ", ".join(f"{b['label']} {b['score']:.2f}" for b in r["boxes"] or []) or "no box"
        iou = "" if not r["_iou"] else " · IoU " + ", ".join(
            f"{class_names[c] if 0 <= c < len(class_names) else c} {v:.2f}" for c, v in sorted(r["_iou"].items()))
        return {"src": f"images/{stem}.jpg", "zoom": f"images/{stem}-zoom.jpg", "alt": r["image_id"],
                "title": captions[r["image_id"]], "line": f"{r['width']}x{r['height']} · {scores}{iou}",
                "overlaid": overlaid}

    sections = []
    for label, group in sample.items():
        count = per_class.get(label, sum(1 for r in rows if not r["boxes"]))
        sections.append({"label": label, "total": images_per_class.get(label, count),
                         "figures": [figure(r, label, "") for r in group]})
    ranked_out = []
    for anchor, title, note, group, total in ranked:
        figs = [figure(r, (r["boxes"][0]["label"] if r["boxes"] else NO_BOX), f"{anchor}-") for r in group]
        ranked_out.append({"anchor": anchor, "title": title, "note": note, "figures": figs, "total": total})

    sheet = viz.contact_sheet(tiles) if tiles else viz.placeholder((320, 80), "no images")
    sheet.save(os.path.join(out, "contact_sheet.png"))
    _write_plots(out, rows, boxes, class_names, per_class)
    page = _page_html(args, summary, rows, failures, boxes, class_names, evaluation, ranked_out, sections,
                      per_class=per_class, images_per_class=images_per_class,
                      has_cams=has_cams, has_truth=has_truth, unavailable=counters["unavailable"])
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    info = {"index": os.path.join(out, "index.html"), "contact_sheet": os.path.join(out, "contact_sheet.png"),
            "classes_shown": list(sample), "sorted_sections": [v["anchor"] for v in ranked_out],
            "pictures": len(tiles), "cam_overlays": counters["overlays"], "unavailable": counters["unavailable"],
            "has_cams": has_cams, "evaluation": evaluation is not None, "seconds": round(time.time() - t0, 2)}
    return info



def _check_args(args) -> str:
    """The flags alone, and the output folder (local, not already a report unless --overwrite); returns it."""
    if args.per_class < 1 or args.max_side < 16:
        raise OptionsError("--per_class must be >= 1 and --max_side >= 16")
    if "://" in args.output:
        raise OptionsError(f"--output must be a local folder (the page is opened from disk), got {args.output}")
    out = os.path.abspath(args.output)
    if os.path.exists(os.path.join(out, "index.html")) and not args.overwrite:
        raise OptionsError(f"--output {out} already holds a report (index.html); pass --overwrite or choose a "
                           "new folder")
    return out


def _read_run(annotations: str):
    """(annotations table, failure rows, summary or {}) of a labelling output; one that holds nothing is refused."""
    results.check_run_folder(annotations)
    table = results.read_table(annotations, "annotations")
    failures = results.read_table(annotations, "failures").to_pylist()
    try:
        summary = results.read_summary(annotations)
    except Exception:
        summary = {}
    if table.num_rows == 0 and not failures and not summary:
        raise OptionsError(f"--annotations {annotations} holds no annotations, failures or summary.json")
    return table, failures, summary


def _write_plots(out: str, rows, boxes, class_names, per_class) -> None:
    """The histograms and the per-class bar chart the page shows, as PNG files in `out`."""
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


def _page_html(args, summary, rows, failures, boxes, class_names, evaluation, ranked_out, sections, *,
               per_class: collections.Counter, images_per_class: collections.Counter,
               has_cams: bool, has_truth: bool, unavailable: int) -> str:
    """index.html from the Jinja2 template (autoescaped): overview, evaluation, classes, sections, failures."""
    class_index = {n: i for i, n in enumerate(class_names)}
    counts = summary.get("counts", {})
    cam_note = ("CAM overlays come from the run's cams column; beside the picture, the CAM of each other boxed "
                "class." if has_cams else
                "This run has no CAMs (it was labelled without --emit_cams): pictures show the boxes only. Label "
                "with --emit_cams to see the heat maps.")
    class_rows = [[n, per_class.get(n, 0), images_per_class.get(n, 0)] for n in class_names]
    class_rows += [[n, c, images_per_class[n]] for n, c in sorted(per_class.items()) if n not in class_index]
    by_stage = collections.Counter((f["stage"], f["error"]) for f in failures)
    overview = [["images read", counts.get("read", "?")], ["annotated", counts.get("annotated", len(rows))],
                ["failed", counts.get("failed", len(failures))], ["balanced", counts.get("balanced", "?")],
                ["boxes", len(boxes)], ["images without a box", sum(1 for r in rows if not r["boxes"])],
                ["model", summary.get("model", {}).get("name") or (rows[0]["model"] if rows else "?")]]
    page = _template().render(
        csp=CSP, style=STYLE, check_script=CHECK_SCRIPT, annotations=args.annotations,
        written=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), overview=overview, evaluation=evaluation,
        class_rows=class_rows, plots=(("score_hist.png", "score histogram"), ("cam_score_hist.png",
                                                                              "CAM score histogram"),
                                      ("box_area_hist.png", "box area histogram")),
        ranked=ranked_out, cam_note=cam_note, has_truth=has_truth, per_class=args.per_class, seed=args.seed,
        unavailable=unavailable, sections=sections, n_failures=len(failures),
        failure_counts=[[s, e, n] for (s, e), n in by_stage.most_common()],
        failure_rows=[[f["stage"], f["error"], f["image_id"] or "", f["source"], f["message"]]
                      for f in failures[: args.max_failures]],
        summary_json=json.dumps(summary, indent=2, sort_keys=True) if summary else "")
    return page



def render(info: dict) -> str:
    return f"report: {info['index']} ({info['pictures']} pictures sampled per class, {info['cam_overlays']} CAM " \
           f"overlays{', with evaluation' if info['evaluation'] else ''})"
