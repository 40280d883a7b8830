"""The output contract: Arrow schemas of the annotation and failure tables, declared once.

Every writer (Beam's WriteToParquet) and reader (tests, `weakloc evaluate`, exporters) uses these constants.
Boxes are in original image pixels (after EXIF orientation), x0y0x1y1, continuous, max edge exclusive.
"""
import pyarrow as pa

CLASS_STRUCT = pa.struct([("class_id", pa.int32()), ("label", pa.string()), ("score", pa.float32())])

BOX_STRUCT = pa.struct(
    [
        ("class_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),  # the class probability (--boxes instances: times the instance's CAM peak)
        ("cam_score", pa.float32()),  # mean normalised CAM inside the box, in [0, 1]
        ("xmin", pa.float32()),
        ("ymin", pa.float32()),
        ("xmax", pa.float32()),
        ("ymax", pa.float32()),
    ]
)

LABEL_STRUCT = pa.struct([("class_id", pa.int32()), ("label", pa.string())])  # class_id -1: not a model class

GT_BOX_STRUCT = pa.struct(
    [
        ("class_id", pa.int32()),
        ("label", pa.string()),
        ("xmin", pa.float32()),
        ("ymin", pa.float32()),
        ("xmax", pa.float32()),
        ("ymax", pa.float32()),
    ]
)

CAM_STRUCT = pa.struct(
    [
        ("class_id", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("values", pa.list_(pa.float32())),  # raw CAM at feature-map resolution, row-major
    ]
)

ANNOTATION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("classes", pa.list_(CLASS_STRUCT)),
        ("boxes", pa.list_(BOX_STRUCT)),
        ("labels", pa.list_(LABEL_STRUCT)),
        ("gt_boxes", pa.list_(GT_BOX_STRUCT)),
        ("model", pa.string()),
    ]
)

# With --emit_cams the annotation rows carry one more column.
ANNOTATION_SCHEMA_WITH_CAMS = ANNOTATION_SCHEMA.append(pa.field("cams", pa.list_(CAM_STRUCT)))

FAILURE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("image_id", pa.string()),  # null when the failure happened before an id was known
        ("stage", pa.string()),  # read | parse | decode | inference
        ("error", pa.string()),  # exception class name
        ("message", pa.string()),
    ]
)


def annotation_schema(emit_cams: bool) -> pa.Schema:
    return ANNOTATION_SCHEMA_WITH_CAMS if emit_cams else ANNOTATION_SCHEMA


def failure_row(source, stage, exc_or_name, message=None, image_id=None) -> dict:
    """A failure row; `exc_or_name` is an exception (its class names the error) or a class name."""
    if isinstance(exc_or_name, BaseException):
        error = type(exc_or_name).__name__
        message = message if message is not None else str(exc_or_name)
    else:
        error = str(exc_or_name)
    return {"source": source, "image_id": image_id, "stage": stage, "error": error, "message": message or ""}
