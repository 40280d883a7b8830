"""`weakloc label` options: parsed once, validated once at launch, before any worker starts.

Everything a user can get wrong (model structure, sidecar, thresholds, inputs, output) is checked here with an
error that says what was expected and what was given. Flags that are not weakloc's pass through to Beam.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import posixpath
import re
from typing import Any, Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options as beam_options

from weakloc.models import annotate, cam, classmap, defaults, files, groundtruth, opening, sidecar, zoo
from weakloc.models import boxes as boxlib
from weakloc.models.cam import CamMethod
from weakloc.models.thresholds import Thresholds, ThresholdsError, parse_stretch

logger = logging.getLogger(__name__)

_TFRECORD_RE = re.compile(r"\.(tfrecords?|tfrec)(\.gz)?$|-of-\d+(\.gz)?$|\.gz$", re.IGNORECASE)
_IMAGE_RE = re.compile(r"\.(jpe?g|png|bmp|gif|webp|tiff?)$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")
OUTPUT_GLOBS = ("annotations-*.parquet", "failures-*.parquet", "summary.json", "metrics.json", "coloc_stats.npz",
                "coloc_stats.json")


class OptionsError(ValueError):
    """A flag or a file named by a flag that cannot work; the message says what was expected."""


def add_model_args(group) -> None:
    """The flags that name a model and how to read it, for every command that runs one (`open_model_from_args`)."""
    group.add_argument("--model", required=True,
                       help=".keras or .h5 classifier (local, gs://, s3://), or keras:NAME for a keras.applications "
                            "ImageNet classifier (keras:MobileNetV2, keras:ResNet50, keras:EfficientNetB0, ...)")
    group.add_argument("--keras_weights", default="imagenet",
                       help="with --model keras:NAME: imagenet (downloaded by Keras), none (random, for tests), or "
                            "a weights file of that architecture (local, gs://)")
    group.add_argument("--method", choices=tuple(opening.METHODS), default="cam",
                       help="cam: GAP + Dense heads, maps from the Dense kernel in the forward pass; gradcam: any "
                            "head ending in class scores, maps from gradients (slower); coloc: dataset-wide "
                            "co-localization (DDT) of the GAP head's features; fused: coloc and CAM together")
    group.add_argument("--feature_layer", help="name of the layer whose output is the CAM feature map")
    group.add_argument("--dense_layer", help="--method cam: name of the Dense layer whose kernel weighs the features")
    group.add_argument("--input_size", help="H,W; overrides the sidecar")
    group.add_argument("--scale", type=float, help="model input = pixels * scale + offset; overrides the sidecar")
    group.add_argument("--offset", type=float, help="see --scale; overrides the sidecar")
    group.add_argument("--class_names", help="comma-separated names in output order; overrides the sidecar")
    group.add_argument("--sidecar", help="preprocessing JSON (default: the model path with .json)")
    group.add_argument("--unsafe_load", action="store_true",
                       help="turn Keras safe_mode off (runs code in the model file; only for files you trust)")


def add_class_map_args(group) -> None:
    """--class_map and how it combines maps, for label and calibrate (`read_class_map`)."""
    group.add_argument("--class_map", metavar="FILE",
                       help="JSON or CSV: dataset label -> model class names (e.g. {\"kangaroo\": [\"wallaby\"]}), "
                            "so an off-the-shelf model boxes the images' own labels (--classes labels); boxes are "
                            "named by the dataset label")
    group.add_argument("--class_map_combine", choices=classmap.COMBINES, default=classmap.DEFAULT_COMBINE,
                       help="how a label mapped to several model classes gets its map: the sum of their CAMs (the "
                            "merged class's CAM; better on the shared photos, BENCHMARKS.md) or the element-wise max")


def add_label_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `weakloc label` (documented in the README)."""
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="file glob of TFRecord shards or image files (local, gs://, s3://); repeatable")
    io.add_argument("--input_format", choices=("tfrecord", "images"),
                    help="default: inferred from the pattern's extension")
    io.add_argument("--labels_from_folder", choices=("auto", "yes", "no"), default="auto",
                    help="images: the parent folder names the image-level label (auto: when the folder part of "
                         "the pattern has a wildcard, as in root/*/*.jpg)")
    io.add_argument("--label_offset", type=int, default=0,
                    help="subtract from integer image/class/label values to get model class ids "
                         "(1 for 1-based TF Object Detection label maps); texts that name a class win")
    io.add_argument("--output", required=True, help="output directory (local, gs://, s3://)")
    io.add_argument("--overwrite", action="store_true", help="replace weakloc files already in --output")
    io.add_argument("--allow_empty", action="store_true",
                    help="exit 0 even when every input failed or no image got a box (default: exit 1, saying why)")
    io.add_argument("--skip_labeled", nargs="+", action="extend", default=[], metavar="PREVIOUS_OUTPUT",
                    help="earlier weakloc output directories: inputs whose image id one of them annotated are "
                         "skipped (counted in the summary), so a nightly run labels only what is new")
    io.add_argument("--num_shards", type=int, default=0, help="Parquet files per table (0: the runner decides)")
    io.add_argument("--max_file_bytes", type=int, default=defaults.MAX_FILE_BYTES,
                    help="refuse image files larger than this, from their listed size, before reading them")
    io.add_argument("--max_pixels", type=int, default=defaults.MAX_PIXELS,
                    help="refuse images with more pixels than this (decompression bombs)")

    mdl = parser.add_argument_group("model")
    add_model_args(mdl)
    mdl.add_argument("--batch_size", type=int, default=defaults.BATCH_SIZE, help="images per forward pass")
    mdl.add_argument("--decode_threads", type=int, default=defaults.DECODE_THREADS,
                     help="threads per worker that decode images ahead of the forward pass, up to two batches "
                          "ahead (0: decode in the worker's own thread, between forward passes)")

    box = parser.add_argument_group("CAM to boxes")
    box.add_argument("--classes", choices=annotate.CLASS_MODES, default="predicted",
                     help="which classes get boxes: the top predictions, the image's own labels, or both")
    add_class_map_args(box)
    box.add_argument("--top_k", type=int, default=defaults.TOP_K, help="predicted classes per image")
    box.add_argument("--min_score", type=float, default=0.0, help="predicted classes below this get no box")
    box.add_argument("--cam_threshold", type=float,
                     help="tau: keep pixels >= tau of the normalised CAM (default: the thresholds file's "
                          "default, else 0.2)")
    box.add_argument("--thresholds",
                     help='JSON {"default": t, "per_class": {"name": t}} (default: <model>.thresholds.json '
                          "beside the model, if present)")
    box.add_argument("--boxes", choices=annotate.BOX_MODES,
                     help="one box per class around the largest component, every component, one box around all "
                          "of them, or one box per object (instances: the rule calibrate --boxes instances chose, "
                          "from the thresholds file) (default: the thresholds file's method, else largest)")
    box.add_argument("--min_box_area", type=float,
                     help="--boxes all|union: smallest component kept, as a fraction of the image (default: the "
                          f"thresholds file's method, else {defaults.MIN_BOX_AREA})")
    box.add_argument("--emit_cams", action="store_true", help="also write the low-resolution CAMs")
    box.add_argument("--box_stretch", metavar="FW,FH",
                     help="scale box width and height about the centre (default: the thresholds file's "
                          '"box_stretch", written by calibrate --fit_box_stretch, else 1,1)')
    box.add_argument("--flip_tta", action="store_true", default=None,
                     help="average each CAM with that of the mirrored picture (one extra forward pass; default: "
                          "the thresholds file's method, else off)")
    box.add_argument("--cam_contrast", action="store_true",
                     help="weigh features by the class's weights minus the mean of all classes' (evidence every "
                          "class shares cancels; default: the thresholds file's \"cam_contrast\", else off)")
    box.add_argument("--no_box_refine", action="store_true",
                     help="ignore the box refinement in the thresholds file (written by calibrate --refine_boxes)")
    from .coloc_options import add_args as add_coloc_args

    add_coloc_args(box)


@dataclasses.dataclass
class LabelConfig:
    """The validated configuration of one `weakloc label` run."""

    inputs: list[str]
    input_format: str
    folder_labels: bool
    label_offset: int
    output: str
    overwrite: bool
    num_shards: int
    max_pixels: int
    max_file_bytes: int
    spec: opening.ModelSpec
    box: annotate.BoxOptions
    batch_size: int
    sidecar_used: Optional[str]
    thresholds_used: Optional[str]
    skip_patterns: list[str] = dataclasses.field(default_factory=list)
    previous: list[dict] = dataclasses.field(default_factory=list)
    decode_threads: int = defaults.DECODE_THREADS
    engine: dict = dataclasses.field(default_factory=dict)  # pipeline/engine.py EngineChoice.to_json()

    @property
    def box_class_names(self) -> tuple[str, ...]:
        """The names boxes and image labels are given: the class map's dataset labels, else the model's classes."""
        return self.box.class_map.labels if self.box.class_map is not None else self.spec.class_names
    coloc: Optional[Any] = None  # models.coloc.ColocConfig for --method coloc|fused

    def header(self) -> dict[str, Any]:
        """The JSON-safe part of summary.json that is known before the run."""
        return {
            "weakloc_version": _version(),
            "inputs": self.inputs,
            "input_format": self.input_format,
            "output": self.output,
            "model": {
                "path": self.spec.path,
                "name": self.spec.name,
                "sha256_16": self.spec.fingerprint,
                "sidecar": self.sidecar_used,
                "input_size": list(self.spec.input_size),
                "scale": self.spec.scale,
                "offset": self.spec.offset,
                "class_names": list(self.spec.class_names),
                "keras_weights": self.spec.keras_weights if zoo.is_keras_application(self.spec.path) else None,
            },
            "engine": self.engine,
            "skip_labeled": self.previous,
            # A different model than an earlier output's is allowed (a retrained model labelling new images),
            # but the mix must be visible to whoever trains on the union.
            "model_differs_from_previous": any(not prev["same_model"] for prev in self.previous),
            "options": {
                # A regressor's run builds the feature-returning method for plain CAMs: it is still "cam".
                "method": "cam" if self.box.regressor is not None and self.coloc is None else self.spec.method,
                "classes": self.box.classes,
                "top_k": self.box.top_k,
                "min_score": self.box.min_score,
                "cam_threshold": self.box.default_threshold,
                "per_class_thresholds": {self.box_class_names[c]: t for c, t in sorted(self.box.per_class.items())},
                "class_map": (self.box.class_map.to_json(self.spec.class_names) if self.box.class_map is not None
                              else None),
                "thresholds_file": self.thresholds_used,
                "boxes": self.box.mode,
                "min_box_area": self.box.min_area,
                "instances": self.box.instances.to_json() if self.box.mode == "instances" else None,
                "batch_size": self.batch_size,
                "decode_threads": self.decode_threads,
                "emit_cams": self.box.emit_cams,
                "flip_tta": self.spec.flip_tta,
                "tta_scales": list(self.spec.tta_scales),
                "fuse": self.coloc.fuse if self.coloc is not None and self.coloc.maps == "fused" else None,
                "coloc_stats": self.coloc.stats_path if self.coloc is not None else None,
                "coloc_layer": self.spec.coloc_layer,
                "cam_contrast": self.spec.contrast,
                "box_stretch": list(self.box.stretch),
                "box_refine": self.box.refine is not None,
                "box_regressor": self.box.regressor is not None,
                "max_pixels": self.max_pixels,
                "max_file_bytes": self.max_file_bytes,
                "label_offset": self.label_offset,
                "folder_labels": self.folder_labels,
            },
        }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("weakloc")
    except Exception:
        return "unknown"


def input_layout(patterns, input_format: Optional[str], labels_from_folder: str) -> tuple[str, bool]:
    """(format, folder labels) of a set of input patterns, as `label`, `train` and `calibrate` all read them.

    The format is the flag's or each pattern's extension (all must agree); folder labels are on when asked, or
    with "auto" for images whose pattern has a wildcard in its folder part (root/*/*.jpg).
    """
    formats = {input_format or infer_input_format(p) for p in patterns}
    if len(formats) != 1:
        raise OptionsError(f"--input patterns mix formats {sorted(formats)}; run them separately")
    fmt = formats.pop()
    if labels_from_folder == "auto":
        folder = fmt == "images" and all(_GLOB_CHARS.search(posixpath.basename(posixpath.dirname(p))) for p in patterns)
    else:
        folder = labels_from_folder == "yes"
    return fmt, folder


def infer_input_format(pattern: str) -> str:
    if _TFRECORD_RE.search(pattern):
        return "tfrecord"
    if _IMAGE_RE.search(pattern):
        return "images"
    raise OptionsError(
        f"cannot tell the input format of {pattern!r} from its extension; pass --input_format tfrecord|images"
    )


def read_json(path: str, what: str) -> Any:
    """The JSON at `path`; a file that does not parse is an OptionsError naming `what`."""
    try:
        return files.read_json(path, what)
    except files.FileFormatError as exc:
        raise OptionsError(str(exc)) from None


def parse_size(value: Optional[str]):
    """`--input_size H,W` (or HxW) -> [H, W]; None when not given."""
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise OptionsError(f"--input_size expects H,W (e.g. 224,224), got {value!r}") from None
    return [h, w]


def open_model_from_args(args: argparse.Namespace, **method_options) -> opening.OpenedModel:
    """`opening.open_model` with the model flags every command shares (`--model`, `--sidecar`, `--keras_weights`,
    `--method`, `--feature_layer`, `--dense_layer`, the preprocessing overrides, `--unsafe_load`); flags a command
    does not have take their defaults. Errors about files and options become OptionsError."""
    get = functools.partial(getattr, args)
    overrides = {
        "input_size": parse_size(get("input_size", None)),
        "scale": get("scale", None),
        "offset": get("offset", None),
        "class_names": sidecar.class_names_from_flag(get("class_names", None)),
    }
    try:
        return opening.open_model(
            args.model, sidecar_path=get("sidecar", None), overrides=overrides, method=get("method", "cam"),
            feature_layer=get("feature_layer", None), dense_layer=get("dense_layer", None),
            keras_weights=get("keras_weights", "imagenet"), safe_mode=not get("unsafe_load", False),
            **method_options,
        )
    except (opening.ModelFileError, files.FileFormatError) as exc:
        raise OptionsError(str(exc)) from None


def build_method(opened: opening.OpenedModel, spec: opening.ModelSpec, top_k: int) -> CamMethod:
    """The runnable method of `spec` on the opened model; what it cannot do with this model is an OptionsError."""
    try:
        return spec.build(opened.keras_model, top_k=top_k)
    except cam.ModelStructureError:
        raise
    except ValueError as exc:
        raise OptionsError(str(exc)) from None


# Runners whose workers run on other machines and cannot see the launcher's local files.
REMOTE_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
# Runners that hand the job to a job service (Flink's, Spark's, Beam's own): their workers are remote unless the
# environment is LOOPBACK (the SDK worker then runs inside the launching process).
PORTABLE_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner", "PrismRunner")


def remote_runner(pipeline_options: beam_options.PipelineOptions) -> Optional[str]:
    """How the job's workers are remote ("DataflowRunner", "FlinkRunner with --environment_type=DOCKER"), else None.

    A portable runner's default environment is DOCKER: a worker on another host, or at least in a container
    that does not see the launcher's files.
    """
    runner = (pipeline_options.view_as(beam_options.StandardOptions).runner or "").split(".")[-1]
    if runner in REMOTE_RUNNERS:
        return runner
    if runner in PORTABLE_RUNNERS:
        env = (pipeline_options.view_as(beam_options.PortableOptions).environment_type or "DOCKER").upper()
        if env != "LOOPBACK":
            return f"{runner} with --environment_type={env}"
    return None


def validate(args: argparse.Namespace, *, runner: Optional[str] = None) -> tuple[LabelConfig, CamMethod]:
    """Check every flag and the files they name, in steps; open the model once and build its method.

    `runner` names the runner when its workers are remote (`remote_runner`): local paths are refused then
    (workers would not find them). Returns the configuration and the method built at launch (`label.prepare` decides whether to keep it).

    Raises:
      OptionsError, cam.ModelStructureError, sidecar.SidecarError, thresholds.ThresholdsError.
    """
    check_flags(args)
    check_remote_paths(args, runner)
    input_format, folder_labels = check_inputs(args)
    check_output(args)
    previous_docs = read_previous_runs(args)
    from . import coloc_options

    thr, thr_path = read_thresholds(args)
    args = coloc_options.follow_thresholds(args, thr, thr_path)
    opened = open_model_from_args(args, flip_tta=bool(args.flip_tta), contrast=args.cam_contrast,
                                  tta_scales=coloc_options.parse_scales(args.tta_scales))
    if folder_labels:
        warn_folder_labels(args, opened.spec.class_names)
    cmap = read_class_map(args, opened.spec.class_names)
    if cmap is not None:
        check_input_labels(args, cmap)
    box, contrast, flip_tta = box_options(args, opened, thr, thr_path, cmap)
    try:
        spec = coloc_options.with_layer(args, opened,
                                        dataclasses.replace(opened.spec, contrast=contrast, flip_tta=flip_tta))
        if box.regressor is not None and spec.method == "cam":
            # The regressor reads the feature maps: the same CAMs from the method that also returns them.
            spec = dataclasses.replace(spec, method="coloc")
    except opening.ModelFileError as exc:
        raise OptionsError(str(exc)) from None
    method = build_method(opened, spec, box.top_k)
    coloc_config = coloc_options.validate(args, opened, spec)
    previous, skip_patterns = previous_runs(previous_docs, spec)
    config = LabelConfig(
        skip_patterns=skip_patterns,
        previous=previous,
        inputs=list(args.input),
        input_format=input_format,
        folder_labels=folder_labels,
        label_offset=args.label_offset,
        output=args.output,
        overwrite=args.overwrite,
        num_shards=args.num_shards,
        max_pixels=args.max_pixels,
        max_file_bytes=args.max_file_bytes,
        spec=spec,
        box=box,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        sidecar_used=opened.sidecar_used,
        thresholds_used=thr_path,
        coloc=coloc_config,
    )
    return config, method


def check_flags(args: argparse.Namespace) -> None:
    """What the flags alone can tell, before any file is read (the box options check theirs in BoxOptions)."""
    try:
        opening.check_keras_weights(args.model, args.keras_weights)
    except opening.ModelFileError as exc:
        raise OptionsError(str(exc)) from None
    for name in ("batch_size", "max_pixels", "max_file_bytes"):
        if getattr(args, name) < 1:
            raise OptionsError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.decode_threads < 0:
        raise OptionsError(f"--decode_threads must be >= 0, got {args.decode_threads}")


def check_remote_paths(args: argparse.Namespace, runner: Optional[str]) -> None:
    """On a runner whose workers run elsewhere, every path they read or write must be on a shared filesystem."""
    if not runner:
        return
    keras_app = zoo.is_keras_application(args.model)
    paths = [("output", args.output)] + [("input", i) for i in args.input]
    if keras_app and args.keras_weights not in ("imagenet", "none"):
        paths.append(("keras_weights", args.keras_weights))
    if not keras_app:  # keras:NAME is built on each worker, nothing to read
        paths.append(("model", args.model))
    local = [f"--{k} {v}" for k, v in paths if "://" not in v]
    if local:
        raise OptionsError(f"{runner} workers cannot read local paths: {local}; use gs://, s3:// (or another "
                           "shared filesystem) for the model, inputs and output")


def check_inputs(args: argparse.Namespace) -> tuple[str, bool]:
    """Every pattern must match something now, so an empty nightly drop fails at once, not on a worker."""
    for pattern in args.input:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise OptionsError(f"--input {pattern!r} matches no file")
    return input_layout(args.input, args.input_format, args.labels_from_folder)


def warn_folder_labels(args: argparse.Namespace, class_names) -> None:
    """Labels from parent folders that name no model class (kangaroo/images/*.jpg): say so at launch."""
    folders = {posixpath.basename(posixpath.dirname(m.path))
               for pattern in args.input for m in FileSystems.match([pattern])[0].metadata_list}
    problem = groundtruth.folder_label_problem(folders, class_names)
    if problem:
        logger.warning("%s%s", problem, "; --classes labels will box nothing" if args.classes == "labels" else "")


def check_output(args: argparse.Namespace) -> None:
    """Never mix a new run's files with an old one's."""
    existing = _existing_outputs(args.output)
    if existing and not args.overwrite:
        if not any(p.endswith("summary.json") for p in existing):
            raise OptionsError(
                f"--output {args.output} holds {len(existing)} files of a run that did not finish (no summary.json, "
                f"e.g. {existing[0]}); pass --overwrite to replace them or choose a new directory"
            )
        raise OptionsError(
            f"--output {args.output} already holds weakloc output ({len(existing)} files, e.g. {existing[0]}); "
            "pass --overwrite to replace it or choose a new directory"
        )


def read_previous_runs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(directory, summary) of each --skip_labeled output; each must be a finished run (summary.json is last)."""
    docs = []
    for prev in args.skip_labeled:
        if prev.rstrip("/") == args.output.rstrip("/"):
            raise OptionsError(f"--skip_labeled {prev} is --output itself; name the previous run's directory")
        summary_path = FileSystems.join(prev.rstrip("/"), "summary.json")
        if not FileSystems.exists(summary_path):
            raise OptionsError(f"--skip_labeled {prev} holds no summary.json: expected the output directory of a "
                               "finished weakloc run")
        docs.append((prev, read_json(summary_path, "summary")))
    return docs


def previous_runs(previous_docs: list[tuple[str, dict]], spec: opening.ModelSpec) -> tuple[list[dict], list[str]]:
    """The summary's record of each earlier output, and the annotation tables whose ids are skipped."""
    previous, skip_patterns = [], []
    for prev, doc in previous_docs:
        model = doc.get("model") or {}
        entry = {
            "output": prev,
            "model": model.get("name"),
            "sha256_16": model.get("sha256_16"),
            "same_model": model.get("sha256_16") == spec.fingerprint,
            "annotated": (doc.get("counts") or {}).get("annotated"),
        }
        previous.append(entry)
        if not entry["same_model"]:
            logger.warning("--skip_labeled %s was labelled with %s, this run uses %s; the union mixes models",
                           prev, entry["model"], spec.name)
        pattern = FileSystems.join(prev.rstrip("/"), "annotations-*.parquet")
        if FileSystems.match([pattern])[0].metadata_list:
            skip_patterns.append(pattern)
    return previous, skip_patterns


def read_thresholds(args: argparse.Namespace) -> tuple[Optional[Thresholds], Optional[str]]:
    """The thresholds file (--thresholds, else `<model>.thresholds.json` beside the model), or (None, None)."""
    thr_path = args.thresholds
    if thr_path is None and not zoo.is_keras_application(args.model):
        beside = posixpath.splitext(args.model)[0] + ".thresholds.json"
        if FileSystems.exists(beside):
            thr_path = beside
            logger.warning("using calibrated thresholds found beside the model: %s", beside)
    if thr_path is None:
        return None, None
    if not FileSystems.exists(thr_path):
        raise OptionsError(f"--thresholds {thr_path} does not exist")
    return Thresholds.from_json(read_json(thr_path, "thresholds"), where=thr_path), thr_path


def box_options(args: argparse.Namespace, opened: opening.OpenedModel, thr: Optional[Thresholds],
                thr_path: Optional[str], cmap: Optional[classmap.ClassMap] = None
                ) -> tuple[annotate.BoxOptions, bool, bool]:
    """Box options from the flags over the thresholds file (flag > file > default), whether CAMs are contrast
    CAMs (the flag, or the file's record of what it was calibrated on) and whether they are flip-averaged (the
    flag, else the method calibrate chose). With a class map, per-class thresholds are per dataset label."""
    thr = thr or Thresholds()
    method = thr.chosen_method()
    flip_tta = method.flip_tta if args.flip_tta is None else args.flip_tta
    boxes = args.boxes or method.boxes
    min_area = method.min_box_area if args.min_box_area is None else args.min_box_area
    if thr_path is not None and (flip_tta, boxes) != (method.flip_tta, method.boxes):
        logger.warning("%s was calibrated for %s maps and --boxes %s; this run makes %s maps and --boxes %s",
                       thr_path, "flip-averaged" if method.flip_tta else "single", method.boxes,
                       "flip-averaged" if flip_tta else "single", boxes)
    if flip_tta and args.method == "gradcam":
        raise OptionsError(f"{thr_path} was calibrated on flip-averaged CAMs, which --method gradcam cannot make")
    contrast = args.cam_contrast
    if thr.cam_contrast is not None:
        # Thresholds and refinement were chosen on these maps: label with the same kind.
        if args.cam_contrast and not thr.cam_contrast:
            logger.warning("--cam_contrast, but %s was calibrated on plain CAMs", thr_path)
        contrast = contrast or thr.cam_contrast
    used_map = thr.calibrated_class_map()
    if used_map is not None and cmap is not None and used_map.get("combine") != cmap.combine:
        logger.warning("%s was calibrated on class maps combined by %s, this run combines them by %s", thr_path,
                       used_map.get("combine"), cmap.combine)
    instances = thr.instances
    if boxes == "instances" and instances is None:
        instances = boxlib.InstanceRule()
        logger.warning("--boxes instances with no instance rule from calibrate --boxes instances: using %s", instances)
    stretch = thr.box_stretch or (1.0, 1.0)
    if args.box_stretch is not None:
        try:
            stretch = parse_stretch(args.box_stretch, "--box_stretch")
        except ThresholdsError as exc:
            raise OptionsError(str(exc)) from None
    regressor_model = read_regressor(method, thr_path)
    if regressor_model is not None:
        conflicts = [("--box_stretch", args.box_stretch is not None), (f"--boxes {boxes}", boxes != "largest"),
                     ("--method gradcam", args.method == "gradcam"), ("--cam_threshold", args.cam_threshold is not None)]
        for what, present in conflicts:
            if present:
                raise OptionsError(f"the box regressor in {thr_path} was self-trained on largest-component CAM "
                                   f"boxes at the file's threshold; it cannot be combined with {what}")
    refiner = None if args.no_box_refine else thr.box_refine
    if refiner is not None:
        # The refinement reads a map's boxes relative to its box at the calibrated threshold: anything that
        # changes that box, or the boxes it is fitted on, makes its corrections meaningless.
        conflicts = [
            ("--box_stretch", args.box_stretch is not None),
            ("the file's box_stretch", args.box_stretch is None and tuple(stretch) != (1.0, 1.0)),
            (f"--boxes {boxes}", boxes != "largest"),
            ("--cam_threshold", args.cam_threshold is not None),
            ("--method gradcam", args.method == "gradcam"),
        ]
        for what, present in conflicts:
            if present:
                raise OptionsError(f"the box refinement in {thr_path} was fitted on largest-component CAM boxes at "
                                   f"the file's thresholds; it cannot be combined with {what}: pass --no_box_refine "
                                   "to label without it")
    if contrast and args.method == "gradcam":
        raise OptionsError(f"{thr_path} was calibrated on contrast CAMs, which --method gradcam cannot make")
    tau = args.cam_threshold if args.cam_threshold is not None else thr.default
    try:
        box = annotate.BoxOptions(
            classes=args.classes,
            top_k=args.top_k,
            min_score=args.min_score,
            default_threshold=defaults.CAM_THRESHOLD if tau is None else tau,
            per_class=thr.class_ids(cmap.labels if cmap is not None else opened.spec.class_names),
            mode=boxes,
            min_area=min_area,
            emit_cams=args.emit_cams,
            stretch=stretch,
            refine=refiner,
            instances=instances or boxlib.InstanceRule(),
            class_map=cmap,
            regressor=regressor_model,
            regress_blend=method.regress_blend,
        )
    except ThresholdsError:
        raise
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    return box, contrast, flip_tta


def beside_thresholds(thr_path: str, rel: str) -> str:
    """A file a thresholds file names (calibrate writes it beside the file): relative to the file's folder, on any
    filesystem (posixpath.join keeps an absolute or gs:// name)."""
    return rel if "://" in rel else posixpath.join(posixpath.dirname(thr_path), rel)


def read_regressor(method, thr_path: Optional[str]):
    """The box regressor a thresholds file's method names (relative to the file, any filesystem), else None."""
    if method.regressor is None:
        return None
    from weakloc.models import regressor

    path = beside_thresholds(thr_path, method.regressor)
    if not FileSystems.exists(path):
        raise OptionsError(f"{thr_path} names the box regressor {path}, which does not exist (calibrate writes it "
                           "beside the thresholds file: move the two together)")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    try:
        return regressor.BoxRegressor.from_bytes(data, path)
    except regressor.RegressorError as exc:
        raise OptionsError(str(exc)) from None


def read_class_map(args: argparse.Namespace, class_names) -> Optional[classmap.ClassMap]:
    """The --class_map file (JSON, or CSV by its extension) checked against the model's classes; None without one."""
    path = getattr(args, "class_map", None)
    if path is None:
        return None
    if getattr(args, "classes", "labels") != "labels":
        raise OptionsError(f"--class_map boxes the images' own labels: it needs --classes labels, got {args.classes}")
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - whatever keeps the file from us, one clear line
        raise OptionsError(f"--class_map {path} cannot be read: {exc}") from None
    try:
        return classmap.parse_class_map(text, class_names, fmt="csv" if path.lower().endswith(".csv") else "json",
                                        combine=getattr(args, "class_map_combine", classmap.DEFAULT_COMBINE))
    except classmap.ClassMapError as exc:
        raise OptionsError(f"--class_map {path}: {exc}") from None


def check_input_labels(args: argparse.Namespace, cmap: classmap.ClassMap) -> None:
    """Read every input's labels once (no pixel decoded) and refuse any the class map does not declare, before a
    worker starts: a label matched by nothing would otherwise fall back to its integer id in the wrong space."""
    from . import inputs  # inputs imports this module

    source = inputs.scan(args.input, input_format=args.input_format,
                         labels_from_folder=getattr(args, "labels_from_folder", "auto"), label_offset=args.label_offset)
    try:
        classmap.check_labels(source.class_names, cmap, f"--input {' '.join(args.input)}")
    except classmap.ClassMapError as exc:
        raise OptionsError(f"--class_map {args.class_map}: {exc}") from None


def check_beam_args(beam_args: list[str], known: Sequence[str] = ()) -> None:
    """Refuse flags that neither weakloc nor any Beam PipelineOptions class knows (Beam would drop them);
    `known` (weakloc's own flags) joins Beam's for the "did you mean"."""
    parser = beam_options._BeamArgumentParser(allow_abbrev=False)  # the parser Beam itself builds
    seen = set()
    for cls in beam_options.PipelineOptions.__subclasses__():
        if str(cls) not in seen:
            seen.add(str(cls))
            cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(beam_args)
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        from .args import unrecognised

        choices = list(known) + [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        raise OptionsError(f"{unrecognised(flags, choices)}: neither a weakloc flag nor a Beam pipeline option")
    if unknown:
        # Typically an unquoted glob the shell expanded: only its first file would reach --input.
        raise OptionsError(
            f"unexpected arguments {unknown}: every value must follow its flag; quote glob patterns "
            "(--input 'dir/*.tfrecord') and repeat --input for several patterns"
        )


def _existing_outputs(output: str) -> list[str]:
    found = []
    for pat in OUTPUT_GLOBS:
        try:
            result = FileSystems.match([FileSystems.join(output, pat)])[0]
        except Exception:
            continue
        found.extend(m.path for m in result.metadata_list)
    return found


def remove_previous_outputs(output: str) -> None:
    """With --overwrite: delete only weakloc's own files in `output`, so no stale shard survives."""
    stale = _existing_outputs(output)
    if stale:
        logger.warning("--overwrite: deleting %d files of a previous run in %s", len(stale), output)
        FileSystems.delete(stale)
