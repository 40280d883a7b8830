"""Opening a model: the one path from `--model` (a `.keras`/`.h5` file or `keras:NAME`) and its sidecar to a
runnable CAM method, used by every command at launch and by every worker.

    opened = open_model("gs://b/cls.keras", method="cam")   # at launch: load, fingerprint, find the head, sidecar
    method = opened.build(top_k=1)                           # a CamModel / GradCamModel ready for uint8 batches
    method = opened.spec.open(top_k=1)                       # on a worker: from the picklable spec alone

`ModelSpec` is the model's declaration: what a worker needs to rebuild the method (no TensorFlow objects), with the
model's `sidecar.Preprocessing` inside it.
"""
from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any, Mapping, Optional

from apache_beam.io.filesystems import FileSystems

from . import engines, sidecar, zoo
from .cam import CamMethod, CamModel
from .coloc import ColocModel
from .files import fetch_checked, fetch_to_local, local_fingerprint, read_json
from .gradcam import GradCamModel
from .graph import ModelStructureError, model_input_size
from .sidecar import Preprocessing

logger = logging.getLogger(__name__)

# The CAM methods by the name `--method` gives; each is a `cam.CamMethod`.
METHODS: dict[str, type[CamMethod]] = {"cam": CamModel, "gradcam": GradCamModel, "coloc": ColocModel,
                                        "fused": ColocModel}


class ModelFileError(ValueError):
    """A model, weights or sidecar file that is missing, or options that cannot go with the model named."""


def check_model_file(local_path: str) -> None:
    """Refuse, with what was found, a file Keras would misreport ("File not found" for a file that exists).

    Raises:
      ModelFileError: empty, JSON (a sidecar or thresholds file), a damaged zip, or neither a zip (.keras) nor
        HDF5 (.h5) file.
    """
    with open(local_path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ModelFileError(f"{local_path} is empty: expected a .keras (zip) or .h5 (HDF5) model file")
    if head.lstrip()[:1] in (b"{", b"["):
        raise ModelFileError(f"{local_path} is a JSON file (a sidecar or thresholds file?), not a model: pass the "
                             ".keras file as --model")
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        if not zipfile.is_zipfile(local_path):
            raise ModelFileError(f"{local_path} is a damaged or truncated .keras archive (its zip directory is "
                                 "missing): copy the model file again")
    elif not head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise ModelFileError(f"{local_path} is not a Keras model file: expected a .keras (zip) or .h5 (HDF5) file, "
                             f"found bytes {head[:4]!r}")


def load_keras_model(local_path: str, *, safe_mode: bool = True):
    """Load a `.keras` or `.h5` model for inference. `safe_mode` refuses arbitrary code (Lambda layers).

    Raises:
      ModelFileError: the file is not a readable model (check_model_file; archives damaged inside).
      ModelStructureError: the model needs safe_mode off.
    """
    import keras

    check_model_file(local_path)
    if not safe_mode:
        logger.warning("loading %s with safe_mode OFF: the file may run arbitrary Python code", local_path)
    try:
        return keras.models.load_model(local_path, compile=False, safe_mode=safe_mode)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelStructureError(
                f"{local_path}: the model needs unsafe deserialization (e.g. a Lambda layer) and safe_mode is on; "
                "pass --unsafe_load only if you trust the file"
            ) from exc
        raise ModelFileError(f"{local_path} cannot be loaded as a Keras model (damaged?): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError from h5py, KeyError in a damaged config ...
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelFileError(f"{local_path} cannot be loaded as a Keras model (damaged?): {type(exc).__name__}: "
                             f"{first}") from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the CAM method (picklable, no TensorFlow objects).

    path: the model file (any Beam filesystem) or `keras:NAME`; name: file name and content hash, written into
    every row; fingerprint: content hash checked on every worker ("" skips the check); prep: input size, scaling
    and class names; keras_weights: for `keras:NAME`, "imagenet", None (random) or a weights file path.
    """

    path: str
    name: str
    prep: Preprocessing
    fingerprint: str = ""
    method: str = "cam"
    feature_layer: Optional[str] = None
    dense_layer: Optional[str] = None
    safe_mode: bool = True
    keras_weights: Optional[str] = "imagenet"
    flip_tta: bool = False  # average the CAMs of each picture and of its mirror image
    contrast: bool = False  # CAMs of each class's margin over the mean class (models/cam.py)
    converted: Optional[engines.ConvertedModel] = None  # the graph converted at launch (--engine); None: Keras
    tta_scales: tuple[float, ...] = (1.0,)  # multi-scale averaging of the feature maps (models/cam.py)
    coloc_layer: Optional[str] = None  # coloc|fused: the layer whose map co-localization reads; None: the head's

    def __post_init__(self):
        if self.method not in METHODS:
            raise ModelFileError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.coloc_layer and self.method not in ("coloc", "fused"):
            raise ModelFileError(f"--coloc_layer goes with --method coloc|fused, not --method {self.method}")
        if self.method == "gradcam":
            if self.flip_tta:
                raise ModelFileError("--flip_tta averages CAMs of the one-pass method; it is not available with "
                                     "--method gradcam")
            if self.contrast:
                raise ModelFileError("--cam_contrast changes the weights of the one-pass CAM; it is not available "
                                     "with --method gradcam")
            if tuple(self.tta_scales) != (1.0,):
                raise ModelFileError("--tta_scales averages the one-pass method's feature maps; it is not "
                                     "available with --method gradcam")
            if self.dense_layer:
                raise ModelFileError("--dense_layer is for --method cam; Grad-CAM differentiates the class scores "
                                     "at the output")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.prep.input_size

    @property
    def scale(self) -> float:
        return self.prep.scale

    @property
    def offset(self) -> float:
        return self.prep.offset

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.prep.class_names

    def head_options(self) -> dict[str, Any]:
        """The options that locate the method's head in the graph (`CamMethod.find_head`)."""
        if self.method == "gradcam":
            return {"feature_layer": self.feature_layer}
        return {"feature_layer": self.feature_layer, "dense_layer": self.dense_layer}

    def load_keras(self):
        """The Keras model, as a worker gets it: fetched, its content hash checked, loaded (or built)."""
        if zoo.is_keras_application(self.path):
            weights = self.keras_weights
            if weights not in (None, "imagenet"):
                weights = fetch_checked(weights, self.fingerprint)
            model, _ = zoo.build(self.path, weights=weights)
            return model
        return load_keras_model(fetch_checked(self.path, self.fingerprint), safe_mode=self.safe_mode)

    def build(self, keras_model, *, top_k: int) -> CamMethod:
        """The method named by `method` on a loaded Keras model."""
        options = dict(self.head_options())
        if self.method != "gradcam":
            options.update(flip_tta=self.flip_tta, contrast=self.contrast, scales=self.tta_scales)
        if self.coloc_layer:
            options.update(coloc_layer=self.coloc_layer)
        return METHODS[self.method](keras_model, input_size=self.input_size, scale=self.scale, offset=self.offset,
                                    top_k=top_k, **options)

    def open(self, *, top_k: int):
        """What a worker does: the graph converted at launch on its engine (engines.EngineCam, no TensorFlow
        imported), else load the Keras model and build the method. Either has the method's call and outputs."""
        if self.converted is not None:
            return engines.open_converted(self.converted)
        return self.build(self.load_keras(), top_k=top_k)


@dataclasses.dataclass
class OpenedModel:
    """A model opened at launch: its spec, the loaded Keras model, its head and where its sidecar came from."""

    spec: ModelSpec
    keras_model: Any
    num_classes: int
    head_description: str
    sidecar_used: Optional[str]

    def build(self, *, top_k: int = 1) -> CamMethod:
        return self.spec.build(self.keras_model, top_k=top_k)


def open_model(
    model: str,
    *,
    sidecar_path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    method: str = "cam",
    feature_layer: Optional[str] = None,
    dense_layer: Optional[str] = None,
    keras_weights: str = "imagenet",
    safe_mode: bool = True,
    flip_tta: bool = False,
    contrast: bool = False,
    tta_scales: tuple[float, ...] = (1.0,),
) -> OpenedModel:
    """Open `model` once: fingerprint its bytes (or build the keras.applications classifier), load it, find the
    head `method` needs and reconcile the sidecar (`sidecar_path`, else the model path with `.json`) with the
    flag `overrides` (input_size, scale, offset, class_names; None = not given) and the model itself.

    Raises:
      ModelFileError: a missing file, or options that do not go with this model.
      graph.ModelStructureError: the model lacks the head the method needs.
      sidecar.SidecarError: preprocessing that does not fit the model.
      files.FileFormatError: a sidecar that is not JSON.
    """
    check_keras_weights(model, keras_weights)
    keras_app = zoo.is_keras_application(model)
    if keras_app:
        keras_model, base_doc, fingerprint, name, weights = _keras_application(model, keras_weights)
    else:
        if not FileSystems.exists(model):
            raise ModelFileError(f"--model {model} does not exist")
        local = fetch_to_local(model)
        fingerprint = local_fingerprint(local)
        keras_model = load_keras_model(local, safe_mode=safe_mode)
        base_doc, name, weights = {}, f"{posixpath.basename(model)}@sha256:{fingerprint}", None
    cls = METHODS.get(method)
    if cls is None:
        raise ModelFileError(f"--method must be one of {sorted(METHODS)}, got {method!r}")
    try:
        head = cls.find_head(keras_model, **({"feature_layer": feature_layer} if method == "gradcam" else
                                             {"feature_layer": feature_layer, "dense_layer": dense_layer}))
    except ModelStructureError as exc:
        if method != "gradcam":
            raise ModelStructureError(f"{exc}; --method gradcam handles other heads (slower)") from exc
        raise
    logger.info("%s head: %s", "Grad-CAM" if method == "gradcam" else "GAP", head.description)
    side_doc, side_used = _sidecar_doc(model, sidecar_path, keras_app)
    if base_doc:
        side_doc = {**base_doc, **(side_doc or {})}
    prep = sidecar.resolve_preprocessing(side_doc, overrides=dict(overrides or {}),
                                         model_input_size=model_input_size(keras_model),
                                         num_classes=int(head.num_classes))
    spec = ModelSpec(path=model, name=name, prep=prep, fingerprint=fingerprint, method=method,
                     feature_layer=feature_layer, dense_layer=dense_layer, safe_mode=safe_mode,
                     keras_weights=weights, flip_tta=flip_tta, contrast=contrast, tta_scales=tuple(tta_scales))
    return OpenedModel(spec, keras_model, int(head.num_classes), head.description, side_used)


def check_keras_weights(model: str, keras_weights: str) -> None:
    """Weights other than the default go with `keras:NAME` only (a model file carries its own)."""
    if keras_weights != "imagenet" and not zoo.is_keras_application(model):
        raise ModelFileError(f"--keras_weights goes with --model keras:NAME, not with --model {model}")


def _sidecar_doc(model: str, sidecar_arg: Optional[str], keras_app: bool):
    """(sidecar document or None, the path it came from or None)."""
    side_path = sidecar_arg or (None if keras_app else sidecar.sidecar_path(model))
    if side_path and FileSystems.exists(side_path):
        return read_json(side_path, "sidecar"), side_path
    if sidecar_arg:
        raise ModelFileError(f"--sidecar {sidecar_arg} does not exist")
    if not keras_app:
        logger.warning("no sidecar at %s; preprocessing comes from flags and defaults", side_path)
    return None, None


def _keras_application(model: str, keras_weights: str):
    """`keras:NAME`: build it now (downloading ImageNet weights if need be) so failures show at launch.

    Returns (keras model, sidecar-like doc with its preprocessing and ImageNet names, fingerprint, row name,
    the weights a worker asks for: "imagenet", None or the weights file).
    """
    weights_file = keras_weights if keras_weights not in ("imagenet", "none") else None
    weights = {"imagenet": "imagenet", "none": None}.get(keras_weights, weights_file)
    fingerprint, label = "", keras_weights
    if weights_file:
        if not FileSystems.exists(weights_file):
            raise ModelFileError(f"--keras_weights {weights_file} does not exist")
        weights = fetch_to_local(weights_file)
        fingerprint = local_fingerprint(weights)  # of the weights file, checked on every worker
        label = "sha256:" + fingerprint
    elif weights is None:
        logger.warning("--keras_weights none: %s gets random weights; its boxes mean nothing", model)
    try:
        keras_model, prep = zoo.build(model, weights=weights)
    except zoo.ZooError as exc:
        raise ModelFileError(str(exc)) from exc
    return keras_model, prep.to_json(), fingerprint, f"{model}@{label}", weights_file or (
        None if keras_weights == "none" else keras_weights)
