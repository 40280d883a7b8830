"""`weakloc export`: a labelling run's Parquet -> COCO, YOLO, Pascal VOC or TF Object Detection TFRecords.

    weakloc export --annotations weak_labels/2026-11-25 --format coco --output coco/ [--min_score 0.5]

The filter and class map (models/export.py) are applied once, the same way for every format; `export.json` in the
output folder records them, the counts of what was kept and dropped, and every file written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import time
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from weakloc.models import export as fmt
from weakloc.models import files

from . import ground_truth, progress, results, sources, storage
from .options import OptionsError
from .args import Parser, annotations_flag, ground_truth_flag

logger = logging.getLogger(__name__)

SUMMARY = "export.json"


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc export", description=__doc__.splitlines()[0], parents=[
        annotations_flag(), ground_truth_flag("true boxes to export beside the weak ones (coco: ground_truth.json)",
                                              "the boxes the inputs carried")])
    ap.add_argument("--format", required=True, choices=fmt.FORMATS, help="what to write")
    ap.add_argument("--output", required=True, help="folder to write (local, gs://, s3://)")
    ap.add_argument("--overwrite", action="store_true", help="write into a folder that holds an earlier export")
    flt = ap.add_argument_group("which boxes (the same for every format)")
    flt.add_argument("--min_score", type=float, default=0.0, help="class probability at least this")
    flt.add_argument("--min_cam_score", type=float, default=0.0, help="mean normalised CAM in the box at least this")
    flt.add_argument("--min_side", type=float, default=0.0, help="box width and height at least this many pixels")
    flt.add_argument("--min_area", type=float, default=0.0, help="box area at least this fraction of the image")
    flt.add_argument("--max_area", type=float, default=1.0, help="box area at most this fraction of the image")
    flt.add_argument("--class_map", help='rename or drop classes: "cat=animal,dog=animal,bird=" or JSON '
                                         '{"cat": "animal", "bird": null}, or a path to such a JSON file')
    flt.add_argument("--keep_empty", action="store_true", help="also export images left without boxes")
    ap.add_argument("--num_shards", type=int, default=1, help="tfrecord: number of output shards")
    ap.add_argument("--val_percent", type=float, default=10.0,
                    help="yolo: share of images in the val split (stable: CRC32 of the image id)")
    ap.add_argument("--copy_images", action="store_true",
                    help="coco, yolo, voc: also copy each picture, re-read from its source, beside the labels "
                         "(images/, or JPEGImages/ for voc); tfrecord always holds them")
    return ap


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _class_map_text(value: str) -> str:
    if value.strip().startswith("{") or "=" in value:
        return value
    if not FileSystems.exists(value):
        raise OptionsError(f"--class_map {value!r} is neither name=new pairs, JSON, nor an existing file")
    with FileSystems.open(value) as f:
        return f.read().decode("utf-8")


def load(annotations: str) -> tuple[list[dict], list[str], dict]:
    """Rows, the model's class names and the run summary of a labelling output folder."""
    results.check_run_folder(annotations)
    table = results.read_table(annotations, "annotations")
    try:
        summary = results.read_summary(annotations)
    except Exception:
        summary = {}
    if table.num_rows == 0 and not summary:
        raise OptionsError(f"--annotations {annotations} holds no annotations-*.parquet and no summary.json")
    names = summary.get("model", {}).get("class_names")
    rows = table.drop_columns([c for c in ("cams",) if c in table.column_names]).to_pylist()
    if not names:
        names = sorted({b["label"] for r in rows for b in r["boxes"] or []})
        logger.warning("no class names in %s/summary.json: taken from the boxes (%s)", annotations, names)
    return rows, list(names), summary


def _write_coco(es: fmt.ExportSet, out: str) -> list[str]:
    files = {"instances.json": fmt.coco_dataset(es), "results.json": fmt.coco_results(es)}
    if not files["results.json"]:
        logger.warning("no box passed the filter: results.json is empty, which pycocotools' loadRes cannot load")
    if any(im.gt_boxes for im in es.images):
        files["ground_truth.json"] = fmt.coco_dataset(es, ground_truth=True, description="input boxes")
    for name, doc in files.items():
        _write(FileSystems.join(out, name), json.dumps(doc).encode())
    return list(files)


def _write_yolo(es: fmt.ExportSet, out: str, stems: dict, val_percent: float) -> list[str]:
    written = ["data.yaml", "images.txt"]
    root = out if "://" in out else os.path.abspath(out)
    _write(FileSystems.join(out, "data.yaml"), fmt.yolo_data_yaml(es.categories, root).encode())
    index = []
    for im in es.images:
        split = fmt.yolo_split(im.image_id, val_percent)
        _write(FileSystems.join(out, "labels", split, stems[im.image_id] + ".txt"), fmt.yolo_lines(im).encode())
        index.append({"stem": stems[im.image_id], "split": split, "image_id": im.image_id, "source": im.source})
    _write(FileSystems.join(out, "images.txt"), "".join(json.dumps(r) + "\n" for r in index).encode())
    n_val = sum(r["split"] == "val" for r in index)
    if index and n_val in (0, len(index)):
        logger.warning("YOLO split: %d of %d images in val (--val_percent %g); Ultralytics needs both splits",
                       n_val, len(index), val_percent)
    return written + [f"labels/train/ ({len(index) - n_val} files)", f"labels/val/ ({n_val} files)"]


def _write_voc(es: fmt.ExportSet, out: str, stems: dict) -> list[str]:
    for im in es.images:
        stem = stems[im.image_id]
        filename = posixpath.basename(im.file_name) if im.file_name else \
            stem + (fmt.image_extension(im.image_id) or ".jpg")
        _write(FileSystems.join(out, "Annotations", stem + ".xml"), fmt.voc_xml(im, filename))
    _write(FileSystems.join(out, "labels.txt"), "".join(n + "\n" for n in es.categories).encode())
    return ["labels.txt", f"Annotations/ ({len(es.images)} files)"]


# Where each format's tools look for the pictures.
IMAGE_FOLDERS = {"coco": "images", "yolo": "images", "voc": "JPEGImages"}


def _copy_images(es: fmt.ExportSet, out: str, folder, counts: dict, stems: dict) -> list[str]:
    """Copy each image's original bytes to `folder/<stem><ext>`; images whose source cannot be read leave the
    export (labels without their picture would mislead a trainer) and are listed in counts."""
    by_source = {im.source: im for im in es.images}
    missing = []
    for source, data, reason in sources.iter_image_bytes(
            progress.counted([im.source for im in es.images], len(es.images), "export: pictures copied")):
        im = by_source[source]
        if data is None:
            missing.append({"source": source, "reason": reason})
            logger.warning("left out of the export (no image bytes): %s", reason)
            continue
        ext = fmt.sniff_format(data)[1] or fmt.image_extension(im.image_id) or ".img"
        where = folder(im) if callable(folder) else folder
        im.file_name = f"{where}/{stems[im.image_id]}{ext}"
        _write(FileSystems.join(out, im.file_name), data)
    es.images = [im for im in es.images if im.file_name]
    counts["images_copied"] = len(es.images)
    counts["images_without_bytes"] = missing
    return [f"{folder if isinstance(folder, str) else 'images/<split>'}/ ({len(es.images)} files)"]


def _write_tfrecord(es: fmt.ExportSet, out: str, num_shards: int, counts: dict) -> list[str]:
    by_source = {im.source: im for im in es.images}
    paths = files.shard_paths(out, "weakloc", num_shards)
    missing = []

    def payloads():
        for source, encoded, reason in sources.iter_image_bytes(
                progress.counted([im.source for im in es.images], len(es.images), "export: pictures read")):
            if encoded is None:
                missing.append({"source": source, "reason": reason})
                logger.warning("left out of the TFRecords (no image bytes): %s", reason)
                continue
            yield fmt.tf_example(by_source[source], encoded, image_format=fmt.sniff_format(encoded)[0])

    written = files.write_tfrecord_shards(payloads(), paths)
    _write(FileSystems.join(out, "label_map.pbtxt"), fmt.label_map_pbtxt(es.categories).encode())
    counts["images_written"] = written
    counts["images_without_bytes"] = missing
    return [posixpath.basename(p) for p in paths] + ["label_map.pbtxt"]


def run(argv: Optional[list[str]] = None) -> dict:
    """Parse flags, read the annotations, filter once, write the chosen format; returns export.json's content."""
    args, storage_flags = parser().parse_known_args(argv)
    storage.use_filesystem_flags(storage_flags)  # --s3_endpoint_url, ... as for `weakloc label`
    t0 = time.time()
    if args.num_shards < 1:
        raise OptionsError(f"--num_shards must be >= 1, got {args.num_shards}")
    out = args.output.rstrip("/")
    if FileSystems.exists(FileSystems.join(out, SUMMARY)) and not args.overwrite:
        raise OptionsError(f"--output {out} already holds an export ({SUMMARY}); pass --overwrite or choose "
                           "a new folder")
    if not 0 <= args.val_percent < 100:
        raise OptionsError(f"--val_percent must be within [0, 100), got {args.val_percent}")
    rows, class_names, summary = load(args.annotations)
    if args.ground_truth:
        for r in rows:
            r["gt_boxes"] = []
        matched = ground_truth.attach_to_rows(rows, ground_truth.load(args.ground_truth, class_names), class_names)
        logger.info("--ground_truth: true boxes for %d of %d images", matched, len(rows))
    class_map = fmt.parse_class_map(_class_map_text(args.class_map), class_names) if args.class_map else {}
    flt = fmt.ExportFilter(min_score=args.min_score, min_cam_score=args.min_cam_score, min_side=args.min_side,
                           min_area=args.min_area, max_area=args.max_area, class_map=class_map,
                           keep_empty=args.keep_empty)
    es = fmt.select(rows, class_names, flt)
    counts = dict(es.counts)
    files = []
    stems = fmt.export_stems(es.images)
    if args.copy_images and args.format != "tfrecord":
        folder = IMAGE_FOLDERS[args.format]
        if args.format == "yolo":  # images/train or images/val, beside labels/train or labels/val
            folder = lambda im: f"images/{fmt.yolo_split(im.image_id, args.val_percent)}"  # noqa: E731
        files = _copy_images(es, out, folder, counts, stems)
    if args.format == "coco":
        files += _write_coco(es, out)
    elif args.format == "yolo":
        files += _write_yolo(es, out, stems, args.val_percent)
    elif args.format == "voc":
        files += _write_voc(es, out, stems)
    else:
        files += _write_tfrecord(es, out, args.num_shards, counts)
    doc = {"format": args.format, "output": out, "annotations": args.annotations,
           "model": summary.get("model", {}).get("name"),
           "categories": es.categories, "filter": flt.to_json(), "counts": counts, "files": files,
           "seconds": round(time.time() - t0, 2)}
    _write(FileSystems.join(out, SUMMARY), json.dumps(doc, indent=2).encode())
    return doc


def render(doc: dict) -> str:
    c = doc["counts"]
    return (f"exported {c['images_out']} images, {c['boxes_out']} boxes ({c['boxes_in'] - c['boxes_out']} dropped) as "
            f"{doc['format']} to {doc['output']}: " + ", ".join(doc["files"]))
