"""`weakloc calibrate`: choose how CAMs become boxes, on a few boxed images, for `weakloc label --thresholds`.

    weakloc calibrate --input 'shards/calib-*.tfrecord' --model models/digits.keras --output models/digits.thresholds.json

Every method of `models/choose.py`'s table (plain or contrast CAMs, flip averaging, box rules, a box stretch, the
box refinement; thresholds per class or global) is fitted on four fifths of the (image, class with true boxes)
pairs and scored on the fifth it did not see, for the mean box accuracy over IoU 0.3/0.5/0.7 (the operating point
of clovaai/wsolevaluation's MaxBoxAccV2); the best is refitted on all pairs and written: thresholds
(tau = 0.00, 0.01, ..., 0.99), the method and the table of candidates. Written as `<model>.thresholds.json`,
`label` picks it up by itself and boxes as the winner does, with no other flag. The method flags
(--cam_contrast, --flip_tta, --boxes, --fit_box_stretch, --refine_boxes) force one method instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os

import numpy as np

from weakloc.models import boxes as boxlib
from weakloc.models import annotate, cam, choose, coloc, defaults, detection, metrics, regressor
from weakloc.models.thresholds import Method, Thresholds

from . import coloc_options, engine, ground_truth, inputs, options, progress
from .args import Parser, ground_truth_flag
from .options import OptionsError

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc calibrate", description=__doc__.splitlines()[0], parents=[ground_truth_flag(
        "true boxes to calibrate on", "the boxes the TFRecord examples carry, or VOC XML beside the image files")])
    ap.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="TFRecord shards whose examples carry true boxes (image/object/bbox/*), or image files "
                         "with VOC XML beside them or named by --ground_truth; repeatable")
    ap.add_argument("--output", required=True, help="thresholds JSON to write")
    ap.add_argument("--min_per_class", type=int, default=defaults.MIN_PER_CLASS,
                    help="a class gets its own threshold only with at least this many boxed images")
    ap.add_argument("--shrink", type=float, default=defaults.THRESHOLD_SHRINK, metavar="MAPS",
                    help="pull each class's own threshold towards the overall one as if this many more boxed "
                         "images had chosen the overall one: (n t_class + MAPS t) / (n + MAPS); 0 keeps the "
                         "classes' own, so a class fitted on 10 images moves half-way with the default")
    ap.add_argument("--flip_tta", action="store_true", help="calibrate mirrored-average CAMs (as label --flip_tta)")
    ap.add_argument("--boxes", choices=("largest", "union", "instances"), default="largest",
                    help="calibrate the box rule label will use (label --boxes); instances: also choose the "
                         "instance rule (relative area, peak, NMS IoU) with the threshold, by instance F1, on the "
                         "CAMs the flags say, or on the maps of each --candidates row (e.g. cam,fused_mean), "
                         "keeping the best")
    ap.add_argument("--min_box_area", type=float, default=0.01, help="--boxes union: as label --min_box_area")
    ap.add_argument("--fit_box_stretch", action="store_true",
                    help="also choose a (width, height) stretch of the boxes on these images (label applies it)")
    ap.add_argument("--cam_contrast", action="store_true",
                    help="calibrate contrast CAMs (label --cam_contrast; recorded, so label follows by itself)")
    ap.add_argument("--refine_boxes", action="store_true",
                    help="also fit a box refinement on these images from each map's profile across thresholds "
                         "(models/refine.py; label applies it); kept only if cross-validation says it helps")
    ap.add_argument("--candidates", metavar="NAME,...",
                    help="methods to choose among (default: every row of models/choose.py's CANDIDATES: "
                         + ", ".join(c.name for c in choose.CANDIDATES) + ")")
    ap.add_argument("--unlabelled", action="append", default=[], metavar="PATTERN",
                    help="more images, no box needed, typically the images label will box: the box regressor "
                         "(regress rows) self-trains on them, and their image-level labels add to the "
                         "co-localization statistics (coloc and fused rows); the boxed --input images always count "
                         "too. Only the boxed images score the candidates")
    ap.add_argument("--regress_grid", type=int, default=1, metavar="G",
                    help="regress rows: the feature map average-pooled on a G x G grid (1: the GAP vector)")
    ap.add_argument("--regress_quantile", type=float, default=regressor.CONFIDENT_QUANTILE, metavar="Q",
                    help="regress rows: a pseudo-box trains the regressor when its class score and box score "
                         "are both at or above this quantile of theirs over the pool")
    ap.add_argument("--batch_size", type=int, default=defaults.CALIBRATE_BATCH_SIZE, help="images per forward pass")
    ap.add_argument("--label_offset", type=int, default=0,
                    help="subtract from integer box labels to get model class ids (as label --label_offset)")
    ap.add_argument("--input_format", choices=("tfrecord", "images"),
                    help="default: inferred from the pattern's extension")
    options.add_model_args(ap.add_argument_group("model"))
    options.add_class_map_args(ap.add_argument_group("class map (as label's; thresholds are then per dataset label)"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    engine.add_engine_args(ap)
    return ap


def class_maps(model: cam.CamMethod, examples, *, batch_size: int = 64, class_map=None, transform=None):
    """CAMs of every (image, class with true boxes) pair, normalised, with the truths in model-input pixels.

    With a class map the classes are its dataset labels, each label's map combined from its model classes' as
    `label --class_map` combines them (labels mapped to nothing are left out); top-1 is right when the model's
    top class is one of the label's.

    Returns (normed float32 (N, H, W), valid bool (N,), truths list of (m, 4), class ids int (N,), top-1 correct
    bool (N,), images used). `transform` (CamOutputs -> CamOutputs) replaces each batch's maps before they
    are read (co-localization maps, `coloc_pool`).
    """
    h, w = model.input_size
    scale = np.array([w, h, w, h], np.float32)
    pixels, classes, truths, used = [], [], [], 0
    for ex in examples:
        ids = np.asarray(ex.gt_ids[: len(ex.gt_boxes)])
        known = sorted({int(c) for c in ids if c >= 0 and (class_map is None or class_map.members[c])})
        used += bool(known)
        for c in known:
            pixels.append(ex.pixels)
            classes.append(c)
            truths.append(ex.gt_boxes[: len(ids)][ids == c] * scale)
    if not pixels:
        raise OptionsError("no input carries true boxes of a class the model knows: nothing to calibrate on")
    normed, valid, top1 = [], [], []
    classes = np.asarray(classes, np.int32)
    if class_map is None:
        members = classes[:, None]
    else:  # each label's model classes, -1 padded
        members = annotate.padded_ids([class_map.members[c] for c in classes.tolist()])
    for s in range(0, len(pixels), batch_size):
        mem = members[s : s + batch_size]
        out = model(np.stack(pixels[s : s + batch_size]), extra=mem)
        if transform is not None:
            out = transform(out)
        k = out.top_classes.shape[1]
        if class_map is None:
            raw = out.column(k)
        else:
            raw = cam.upsample(np.stack([class_map.combine_maps(out.low_res[i, k + np.flatnonzero(row >= 0)])
                                         for i, row in enumerate(mem)]), out.size)
        n_, v_ = boxlib.normalize_cams(raw)
        normed.append(n_)
        valid.append(v_)
        top1.append((out.top_classes[:, :1] == mem).any(axis=1))
    return np.concatenate(normed), np.concatenate(valid), truths, classes, np.concatenate(top1), used


def coloc_pool(model: cam.CamMethod, examples, unlabelled=(), *, batch_size: int = 64, class_map=None) -> list:
    """Co-localization statistics ([(class id, ClassStats, Component)]) of the boxed images' own features and of
    the `unlabelled` ones': a boxed image counts once for each class it has true boxes of (the classes
    `class_maps` pairs it with), an unlabelled one for each of its image-level labels (no box is read), and the
    CAM of that class signs its component. Features are kept as float16, as `label --method coloc` keeps them,
    so the maps are the ones label makes.

    With a class map the boxes name dataset labels; the statistics are keyed by the model classes mapped from
    them (a label's images count for each of its model classes), so each model class's map becomes its
    co-localization map before the class map combines them, as `label --class_map --method coloc` does."""
    pixels, keys = [], []
    for ex, boxed in [(ex, True) for ex in examples] + [(ex, False) for ex in unlabelled]:
        ids = ex.gt_ids[: len(ex.gt_boxes)] if boxed else ex.label_ids
        known = sorted({int(c) for c in np.asarray(ids) if c >= 0})
        if class_map is not None:
            known = sorted({m for c in known for m in class_map.members[c]})
        if known:
            pixels.append(ex.pixels)
            keys.append(known)
    feats, maps = [], []
    for s in range(0, len(pixels), batch_size):
        rows = keys[s : s + batch_size]
        out = model(np.stack(pixels[s : s + batch_size]), annotate.padded_ids(rows))
        k = out.top_classes.shape[1]
        feats.extend(out.features.astype(np.float16))
        maps.extend(out.low_res[i, k : k + len(r)] for i, r in enumerate(rows))
    return coloc.pooled_components(feats, keys, maps)


def coloc_transform(pool: list, kind: choose.MapKind):
    """CamOutputs -> the same with co-localization (or fused) maps of `pool`'s components, as label makes them."""
    comps = {c: comp for c, _, comp in pool}
    maps, mode = ("coloc", "mean") if kind.coloc == "coloc" else ("fused", kind.coloc)

    def transform(out):
        out = dataclasses.replace(out, features=out.features.astype(np.float16))
        return coloc.colocalized(out, comps, maps, mode)[0]

    return transform


def regress_pool(model: cam.CamMethod, boxed, unlabelled=(), *, grid: int = 1,
                 quantile: float = regressor.CONFIDENT_QUANTILE, batch_size: int = 64, class_map=None):
    """What the regress rows need, from a method that returns its feature maps: the `choose.RegressPool` of the
    boxed and the unlabelled examples (each image's top-1 class map, probability and descriptor; no true box is
    read) and the descriptors of the boxed examples' (image, class) pairs, float32 (N, D) in `class_maps`' order."""
    def pass_one(examples):
        normed, valid, top, desc = [], [], [], []
        for s in range(0, len(examples), batch_size):
            out = model(np.stack([ex.pixels for ex in examples[s : s + batch_size]]))
            n_, v_ = boxlib.normalize_cams(out.column(0))
            normed.append(n_)
            valid.append(v_)
            top.append(out.top_scores[:, 0])
            desc.append(regressor.descriptors(out.features, grid))
        return normed, valid, top, desc

    boxed, unlabelled = list(boxed), list(unlabelled)
    parts = pass_one(boxed + unlabelled)
    normed, valid, top, desc = (np.concatenate(p) for p in parts)
    pairs = []
    for ex in boxed:  # the pairs class_maps makes, each with its image's descriptor
        ids = np.asarray(ex.gt_ids[: len(ex.gt_boxes)])
        known = {int(c) for c in ids if c >= 0 and (class_map is None or class_map.members[c])}
        pairs.append(len(known))
    pair_desc = np.repeat(desc[: len(boxed)], pairs, axis=0)
    return choose.RegressPool(normed, valid, top, desc, grid=grid, quantile=quantile), pair_desc


def regressor_file(output: str) -> str:
    """Where a regress winner's regressor goes: `<output without .json>.regress.npz` beside the thresholds file
    (named relatively in it, so the two move together)."""
    return os.path.splitext(os.path.abspath(output))[0] + ".regress.npz"


def _candidates(args, num_classes: int, finer_layer: str | None = None) -> list:
    """The candidates to try: the whole table, those named by --candidates, or the one the method flags force
    (with --refine_boxes, that one with and without the refinement, so it is kept only where it helps). The
    table's rows on a finer feature map need one (`finer_layer`: what `--coloc_layer auto` resolves to)."""
    forced = args.flip_tta or args.cam_contrast or args.boxes != "largest" or args.fit_box_stretch or args.refine_boxes
    if forced and args.candidates:
        raise OptionsError("--candidates chooses among methods; the method flags (--flip_tta, --cam_contrast, "
                           "--boxes, --fit_box_stretch, --refine_boxes) force one: use one or the other")
    if forced:
        kind = choose.MapKind(contrast=args.cam_contrast, flip_tta=args.flip_tta)
        base = choose.Candidate("flags", kind, boxes=args.boxes, post="stretch" if args.fit_box_stretch else "none")
        if not args.refine_boxes:
            return [base]
        return [base, choose.Candidate("flags_refine", kind, post="refine", per_class=False)]
    if args.candidates:
        return _named_candidates(args)
    # Contrast needs two classes to contrast; Grad-CAM makes neither contrast nor flip-averaged maps, nor the
    # GAP head's feature maps that co-localization and the regressor read.
    return [c for c in choose.CANDIDATES if (num_classes >= 2 or not c.maps.contrast)
            and (args.method == "cam" or (c.maps == choose.PLAIN and c.post != "regress"))
            and (finer_layer is not None or not c.maps.coloc_layer)]


def _named_candidates(args) -> list:
    """The rows --candidates names, in its order."""
    try:
        return [choose.candidate(n.strip()) for n in args.candidates.split(",") if n.strip()]
    except KeyError as exc:
        raise OptionsError(f"--candidates: {exc.args[0]}") from None


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        raise OptionsError(f"--output {args.output} exists; pass --overwrite to replace it")
    if args.regress_grid < 1:
        raise OptionsError(f"--regress_grid must be >= 1, got {args.regress_grid}")
    if not 0.0 <= args.regress_quantile < 1.0:
        raise OptionsError(f"--regress_quantile must be within [0, 1), got {args.regress_quantile}")
    if args.min_per_class < 1:
        raise OptionsError(f"--min_per_class must be >= 1, got {args.min_per_class}")
    if not args.shrink >= 0:  # also refuses nan
        raise OptionsError(f"--shrink must be >= 0, got {args.shrink}")
    if args.refine_boxes and (args.fit_box_stretch or args.boxes != "largest"):
        raise OptionsError("--refine_boxes refines largest-component boxes and replaces the stretch: drop "
                           f"--fit_box_stretch and --boxes {args.boxes}")
    opened = options.open_model_from_args(args, flip_tta=args.flip_tta, contrast=args.cam_contrast)
    prep = opened.spec.prep
    cmap = options.read_class_map(args, prep.class_names)
    if cmap is not None:
        options.check_input_labels(args, cmap)
    box_names = cmap.labels if cmap is not None else prep.class_names
    source = inputs.scan(args.input, input_format=args.input_format, class_names=box_names,
                         label_offset=args.label_offset, labels_from_folder="no")
    source.ground_truth = _ground_truth(args, source, box_names)
    examples = list(progress.counted(inputs.iterate(source, input_size=prep.input_size,
                                                    label_offset=args.label_offset),
                                     source.count, "calibrate: pictures read"))
    engines_used = []
    pools = {}  # MapKind -> (coloc_pool's triples, extractor) of the co-localization kinds tried

    @functools.lru_cache(maxsize=None)
    def unlabelled():
        """The --unlabelled images, read once (image-level labels kept, boxes not needed)."""
        if not args.unlabelled:
            return ()
        more = inputs.scan(args.unlabelled, input_format=args.input_format, class_names=box_names,
                           label_offset=args.label_offset, labels_from_folder="no")
        return tuple(progress.counted(inputs.iterate(more, input_size=prep.input_size, label_offset=args.label_offset),
                                      more.count, "calibrate: unlabelled pictures read"))

    def maps_of(kind):
        spec = dataclasses.replace(opened.spec, contrast=kind.contrast, flip_tta=kind.flip_tta)
        transform = None
        if kind.coloc != "none":
            layer = coloc_options.resolve_layer(opened.keras_model, spec, kind.coloc_layer)
            spec = dataclasses.replace(spec, method="coloc", coloc_layer=layer)
            # On the engine label's --method coloc runs on, which returns the feature maps too.
            model, ran = engine.in_process(args, spec, options.build_method(opened, spec, top_k=defaults.TOP_K))
            made_by = coloc_options.extractor(spec, opened.keras_model)
            # coloc, fused mean and fused product maps of one extractor share their statistics: pooled once.
            same = next((p for p, m in pools.values() if m == made_by), None)
            pool = same if same is not None else coloc_pool(model, examples, unlabelled(),
                                                            batch_size=args.batch_size, class_map=cmap)
            pools[kind] = (pool, made_by)
            transform = coloc_transform(pool, kind)
        else:
            model, ran = engine.in_process(args, spec, options.build_method(opened, spec, top_k=defaults.TOP_K))
            engines_used.append({"name": ran.engine, "precision": ran.precision})
        normed, valid, truths, classes, top1, used = class_maps(model, examples, batch_size=args.batch_size,
                                                                class_map=cmap, transform=transform)
        return choose.Maps(normed, valid, truths, classes), top1, used

    def regress_of():
        """The regress rows' pool and pair descriptors: one more pass, over the boxed and --unlabelled images,
        on the engine label runs the regressor's feature-returning method on, as label makes them."""
        spec = dataclasses.replace(opened.spec, contrast=False, flip_tta=False, method="coloc")
        model, _ = engine.in_process(args, spec, options.build_method(opened, spec, top_k=defaults.TOP_K))
        return regress_pool(model, examples, unlabelled(), grid=args.regress_grid, quantile=args.regress_quantile,
                            batch_size=args.batch_size, class_map=cmap)

    record = {"model": args.model, "inputs": list(args.input), "min_box_area": args.min_box_area,
              "class_map": cmap.to_json(prep.class_names) if cmap is not None else None}
    if args.boxes == "instances":
        thresholds, text = _calibrate_instances(args, maps_of, box_names, record, pools, prep.class_names)
    else:
        try:
            finer = coloc_options.resolve_layer(opened.keras_model, opened.spec, "auto")
        except OptionsError as exc:
            finer = None
            logger.info("no co-localization on a finer map: %s", exc)
        thresholds, text = _choose_method(args, maps_of, box_names, record, pools, prep.class_names, regress_of,
                                          finer)
    thresholds.calibration["engine"] = engines_used[0] if engines_used else None
    warnings = edge_warnings(thresholds)
    text += "".join(w + "\n" for w in warnings)
    doc = thresholds.to_json()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(doc, f, indent=2)
    # What the CLI prints (render); the file holds the document alone.
    return {**doc, REPORT: f"{text}written: {args.output}"}


REPORT = "report"


def stats_folder(output: str) -> str:
    """Where a co-localization winner's statistics go: `<output without .json>.coloc/` beside the thresholds
    file (the file names it relatively, so the two move together)."""
    return os.path.splitext(os.path.abspath(output))[0] + ".coloc"


def _write_coloc_stats(args, pools, kind: choose.MapKind, model_classes) -> tuple:
    """A co-localization winner's statistics written to `stats_folder` for label to reuse: (the folder relative
    to the thresholds file, the layer they read); (None, None) for a CAM winner."""
    if kind.coloc == "none":
        return None, None
    pool, made_by = pools[kind]
    folder = stats_folder(args.output)
    coloc.write_stats(folder, pool, model_classes, made_by)
    return os.path.basename(folder), made_by["coloc_layer"]


def render(result: dict) -> str:
    """What calibrate prints: the candidates, the chosen threshold curve and where the file went."""
    return result[REPORT]


def _choose_method(args, maps_of, box_names, record, pools, model_classes, regress_of,
                   finer_layer=None) -> tuple[Thresholds, str]:
    """Every candidate method cross-validated on the boxed maps (models/choose.py); the winner refitted on all.
    A co-localization winner's statistics are written beside the output (`stats_folder`) for label to reuse,
    a regress winner's regressor likewise (`regressor_file`)."""
    candidates = _candidates(args, len(box_names), finer_layer)
    maps_by_kind = {}
    kinds = list(dict.fromkeys(c.maps for c in candidates))
    for kind in progress.counted(kinds, len(kinds), "calibrate: kinds of map computed"):
        maps_by_kind[kind], top1, used = maps_of(kind)
    pool = None
    if any(c.post == "regress" for c in candidates):
        pool, pair_desc = regress_of()
        maps_by_kind[choose.PLAIN] = dataclasses.replace(maps_by_kind[choose.PLAIN], desc=pair_desc)
    pairs = len(next(iter(maps_by_kind.values())).classes)
    if pairs < choose.FOLDS:
        logger.warning("%d boxed maps are too few to cross-validate methods: calibrating plain CAM only", pairs)
        candidates = [choose.DEFAULT]
        if choose.DEFAULT.maps not in maps_by_kind:
            maps_by_kind[choose.DEFAULT.maps], top1, used = maps_of(choose.DEFAULT.maps)
    try:
        choice = choose.choose(maps_by_kind, candidates, min_per_class=args.min_per_class,
                               min_area=args.min_box_area, shrink=args.shrink, pool=pool)
    except choose.CandidateError as exc:
        raise OptionsError(str(exc)) from None
    winner = choice.winner
    maps = maps_by_kind[winner.candidate.maps]
    # The winner's threshold curve on all these maps (in-sample; the choice itself was cross-validated).
    sweep = metrics.sweep_thresholds(maps.normed, maps.truths, valid=maps.valid, mode=winner.candidate.boxes,
                                     min_area=args.min_box_area)
    counts = {int(c): int((maps.classes == c).sum()) for c in np.unique(maps.classes)}
    stats_rel, coloc_layer = _write_coloc_stats(args, pools, winner.candidate.maps, model_classes)
    regress_rel = None
    if winner.regressor is not None:
        path = regressor_file(args.output)
        with open(path, "wb") as f:
            f.write(winner.regressor.to_bytes())
        regress_rel = os.path.basename(path)
    thresholds = dataclasses.replace(
        winner.thresholds(box_names, coloc_stats=stats_rel, regressor_file=regress_rel, coloc_layer=coloc_layer),
        per_class_shrink=args.shrink if winner.per_class else None,
        candidates=[{"name": s.candidate.name, "cam_contrast": s.candidate.maps.contrast,
                     "flip_tta": s.candidate.maps.flip_tta, "coloc": s.candidate.maps.coloc,
                     "coloc_layer": pools[s.candidate.maps][1]["coloc_layer"] if s.candidate.maps in pools else None,
                     "boxes": s.candidate.boxes, "post": s.candidate.post, "blend": s.candidate.blend,
                     "per_class": s.candidate.per_class,
                     "cv_accuracy": None if s.accuracy is None else s.accuracy.tolist(), "reason": s.reason or None}
                    for s in choice.scores],
        calibration={
            **record,
            "images": used,
            "pairs": pairs,
            "folds": choose.FOLDS,
            "flip_tta": winner.candidate.maps.flip_tta,
            "boxes": winner.candidate.boxes,
            "top1": float(top1.mean()),
            "cv_accuracy": choice.best.accuracy.tolist(),
            "max_box_acc_v2": sweep.max_box_acc_v2,
            "best_mean_accuracy": float(sweep.accuracy[sweep.best_index].mean()),
            "levels": list(sweep.levels),
            "curve": [[float(t), *map(float, a)] for t, a in zip(sweep.taus, sweep.accuracy)],
            "per_class": {box_names[c]: {"pairs": n, "fitted": winner.per_class_fitted.get(c, (None,))[0],
                                         "threshold": winner.per_class.get(c)}
                          for c, n in sorted(counts.items())},
        },
    )
    per = _per_class_text(winner.per_class, winner.per_class_fitted, box_names, winner.default, args)
    notes = ""
    if winner.stretch != (1.0, 1.0):
        notes += f"box stretch: width x{winner.stretch[0]:.2f}, height x{winner.stretch[1]:.2f}\n"
    if winner.refiner is not None:
        notes += f"box refinement from base threshold {winner.default:.2f}, penalty {winner.refiner.alpha:g}\n"
    if regress_rel is not None:
        r = winner.regressor
        notes += (f"box regressor ({r.grid}x{r.grid} pooled features, ridge penalty {r.alpha:g}) self-trained on "
                  f"{r.samples} confident pseudo-boxes of {len(pool.top_scores)} images: "
                  f"{regressor_file(args.output)}\n")
    if stats_rel is not None:
        notes += f"co-localization statistics of the calibration images: {stats_folder(args.output)}\n"
    text = (f"{_candidates_text(choice)}\n\nthreshold curve of {winner.candidate.name} on all {pairs} maps:\n"
            f"{_curve_text(sweep)}\n\nimages: {used} ({pairs} image-class pairs), top-1 on them {top1.mean():.1%}\n"
            f"chosen: {winner.candidate.name} (cross-validated mean accuracy {choice.best.mean:.1%})\n"
            f"threshold: {winner.default:.2f}   MaxBoxAccV2 of its maps: {sweep.max_box_acc_v2:.1f}\n"
            f"per-class thresholds: {per}\n{notes}")
    return thresholds, text


def _instance_kinds(args) -> list:
    """The kinds of map --boxes instances tries: those of the --candidates rows (their maps only; the instance
    rule replaces their box rule and correction), else the CAMs of --cam_contrast / --flip_tta."""
    if not args.candidates:
        return [choose.MapKind(contrast=args.cam_contrast, flip_tta=args.flip_tta)]
    if args.cam_contrast or args.flip_tta:
        raise OptionsError("--boxes instances --candidates: the rows name their maps (e.g. flip, contrast_flip); "
                           "drop --cam_contrast and --flip_tta")
    return list(dict.fromkeys(c.maps for c in _named_candidates(args)))


def _calibrate_instances(args, maps_of, box_names, record, pools, model_classes) -> tuple[Thresholds, str]:
    """--boxes instances: the threshold and the instance rule (relative area, peak, NMS IoU) chosen together, by
    instance F1, on each kind of map `_instance_kinds` names; the kind with the best F1 wins (the first on ties).
    A co-localization winner's statistics are written beside the output for label to reuse."""
    kinds = _instance_kinds(args)
    tried = []
    for kind in progress.counted(kinds, len(kinds), "calibrate: kinds of map computed"):
        maps, top1, used = maps_of(kind)
        cal = detection.calibrate_instances(maps.normed, maps.truths, maps.classes, valid=maps.valid,
                                            min_per_class=args.min_per_class)
        tried.append((kind, maps, top1, used, cal))
    kind, maps, top1, used, cal = max(tried, key=lambda t: t[4].overall.max_box_acc_v2)
    sweep, r = cal.overall, cal.instances
    stats_rel, coloc_layer = _write_coloc_stats(args, pools, kind, model_classes)
    thresholds = dataclasses.replace(cal.thresholds(box_names, shrink=args.shrink),
                                     cam_contrast=bool(kind.contrast),
                                     per_class_shrink=args.shrink if cal.per_class else None,
                                     method=Method(name="instances", flip_tta=kind.flip_tta, boxes="instances",
                                                   min_box_area=args.min_box_area, coloc=kind.coloc,
                                                   coloc_stats=stats_rel, coloc_layer=coloc_layer))
    thresholds = dataclasses.replace(thresholds, calibration={
        **record, "images": used, "pairs": len(maps.classes), "flip_tta": kind.flip_tta, "boxes": "instances",
        "maps": _kind_name(kind), "maps_tried": {_kind_name(t[0]): t[4].overall.max_box_acc_v2 for t in tried},
        "top1": float(top1.mean()), "max_instance_f1": sweep.max_box_acc_v2, "levels": list(sweep.levels),
        "curve": [[float(t), *map(float, a)] for t, a in zip(sweep.taus, sweep.accuracy)],
        "per_class": {box_names[c]: {"pairs": cal.counts[c],
                                     "fitted": cal.per_class[c].best_threshold if c in cal.per_class else None,
                                     "threshold": cal.class_threshold(c, args.shrink) if c in cal.per_class else None}
                      for c in sorted(cal.counts)},
    })
    per = _per_class_text({c: cal.class_threshold(c, args.shrink) for c in cal.per_class},
                          {c: (cal.per_class[c].best_threshold, cal.counts[c]) for c in cal.per_class}, box_names,
                          sweep.best_threshold, args)
    table = ""
    if len(tried) > 1:
        table = "maps                  max instance F1\n" + "".join(
            f"  {_kind_name(t[0]):20s} {t[4].overall.max_box_acc_v2:6.1f}"
            + ("  <- chosen" if t[0] == kind else "") + "\n" for t in tried) + "\n"
    # The curve is instance F1 at the chosen rule, its best-per-level mean in place of MaxBoxAccV2.
    text = (table + _curve_text(sweep, "F1") + f"\n\nimages: {used} ({len(maps.classes)} image-class pairs), "
            f"top-1 on them {top1.mean():.1%}\nmaps: {_kind_name(kind)}\ndefault threshold: "
            f"{sweep.best_threshold:.2f}   max instance F1: {sweep.max_box_acc_v2:.1f}\nper-class thresholds: {per}\n"
            f"instance rule: components >= {r.min_rel_area:g} of the largest's area with peak >= {r.min_peak:g}, "
            f"NMS IoU {r.nms_iou:g}, "
            + (f"split at peaks {r.peak_distance:g} of the map side apart\n" if r.peak_distance
               else "no peak split\n")
            + (f"co-localization statistics: {stats_folder(args.output)}\n" if stats_rel else ""))
    return thresholds, text


def _kind_name(kind: choose.MapKind) -> str:
    """The name of a kind of map: the first candidate row with those maps (cam, flip, fused_fine_mean, ...)."""
    return next(c.name for c in choose.CANDIDATES if c.maps == kind)


def _per_class_text(per_class: dict, fitted: dict, box_names, default: float, args) -> str:
    """`apple=0.45 (own 0.60 on 10 images)`, and how they were pulled towards the overall threshold."""
    if not per_class:
        return f"none (no class has --min_per_class {args.min_per_class} boxed images, or the method has one threshold)"
    parts = [f"{box_names[c]}={t:.2f}" + (f" (own {fitted[c][0]:.2f} on {fitted[c][1]})" if c in fitted else "")
             for c, t in sorted(per_class.items())]
    return ", ".join(parts) + f"; shrunk towards {default:.2f} by --shrink {args.shrink:g}"


def _candidates_text(choice: choose.Choice) -> str:
    lines = [f"  candidate              {choose.FOLDS}-fold CV acc@0.3 acc@0.5 acc@0.7  mean"]
    for s in choice.scores:
        mark = "  <- chosen" if s.candidate == choice.winner.candidate else ""
        if s.accuracy is None:
            lines.append(f"  {s.candidate.name:22s} not fitted: {s.reason}")
        else:
            a = s.accuracy
            lines.append(f"  {s.candidate.name:22s} {a[0]:17.1%} {a[1]:7.1%} {a[2]:7.1%} {a.mean():6.1%}{mark}")
    return "\n".join(lines)


def _curve_text(sweep: metrics.Sweep, what: str = "acc") -> str:
    lines = ["  tau   " + " ".join(f"{what + '@' + str(lv):>7s}" for lv in sweep.levels) + "  mean"]
    for t, a in zip(sweep.taus, sweep.accuracy):
        if round(t * 100) % 5 == 0 or t == sweep.best_threshold:
            mark = "  <- chosen" if t == sweep.best_threshold else ""
            lines.append(f"  {t:.2f}  {a[0]:7.1%} {a[1]:7.1%} {a[2]:7.1%} {a.mean():6.1%}{mark}")
    return "\n".join(lines)


EDGE_LOW, EDGE_HIGH = 0.0, 0.99  # the ends of the sweep: a full-image box, or a speck at the hottest pixel


def edge_warnings(thresholds: Thresholds) -> list[str]:
    """A loud line for every threshold at an end of the sweep (full-image or near-empty boxes), also logged."""
    out = []
    for name, t in [("default", thresholds.default), *sorted(thresholds.per_class.items())]:
        if t is not None and (t <= EDGE_LOW or t >= EDGE_HIGH):
            what = "full-image boxes" if t <= EDGE_LOW else "boxes around the hottest pixels only"
            out.append(f"WARNING: threshold {name} = {t:.2f} is at the end of the sweep and gives {what}: the CAMs "
                       "do not localise these images; check the model and the boxes before labelling with it")
    for line in out:
        logger.warning("%s", line.removeprefix("WARNING: "))
    return out


def _ground_truth(args, source, class_names):
    """--ground_truth, else VOC XML beside image files, else the boxes TFRecords carry (None)."""
    if args.ground_truth:
        truth = ground_truth.load(args.ground_truth, class_names)
    elif source.input_format == "images":
        truth = ground_truth.beside_images(source.files)
        if truth is None:
            raise OptionsError(f"no true boxes for the {source.count} image files of --input: no VOC XML beside "
                               "them (same stem, or in annots/ or annotations/ next to their folder); pass "
                               "--ground_truth VOC_DIR|COCO.json")
        logger.info("true boxes from VOC XML beside the images: %s", ", ".join(truth.origin[:3]))
    else:
        return None
    names = truth.class_names()
    if names and not set(class_names).intersection(names):
        raise OptionsError(f"the true boxes name {', '.join(names[:8])}, none of which is a model class "
                           f"({', '.join(list(class_names)[:8])})")
    return truth
