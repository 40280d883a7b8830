"""TFRecord framing and `tf.train.Example` parsing in the TF Object Detection API convention.

The framing is read here (not through a Beam source) so that a damaged shard still yields every record before
the damage and then one precise error with the byte offset: a Beam source would fail the whole bundle.
Format: uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data), all little-endian.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from typing import BinaryIO, Iterator

import google_crc32c

# Feature keys of the TF Object Detection API (tf_example_decoder.py), which most image datasets follow.
KEY_ENCODED = "image/encoded"
KEY_SOURCE_ID = "image/source_id"
KEY_FILENAME = "image/filename"
KEY_CLASS_LABEL = "image/class/label"
KEY_CLASS_TEXT = "image/class/text"
KEY_BBOX = ("image/object/bbox/xmin", "image/object/bbox/ymin", "image/object/bbox/xmax", "image/object/bbox/ymax")
KEY_OBJ_LABEL = "image/object/class/label"
KEY_OBJ_TEXT = "image/object/class/text"


class RecordError(ValueError):
    """A shard is damaged at `offset` (bytes into the uncompressed stream)."""

    def __init__(self, offset: int, message: str):
        super().__init__(f"at byte {offset}: {message}")
        self.offset = offset


class ExampleError(ValueError):
    """A record that is not a usable tf.train.Example (unparseable, or no image bytes)."""


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """Bytes of one TFRecord frame holding `data` (what tf.io.TFRecordWriter writes)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def iter_records(stream: BinaryIO, *, max_record_bytes: int = 1 << 30) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for each record of an uncompressed TFRecord stream.

    Raises:
      RecordError: at the first truncated or corrupt frame, after yielding every good record before it.
    """
    offset = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise RecordError(offset, f"truncated record header ({len(header)} of 12 bytes)")
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:])
        if _masked_crc(header[:8]) != length_crc:
            raise RecordError(offset, "length checksum mismatch (corrupt or not a TFRecord file)")
        if length > max_record_bytes:
            raise RecordError(offset, f"record claims {length} bytes, above the {max_record_bytes} byte limit")
        body = stream.read(length + 4)
        if len(body) < length + 4:
            raise RecordError(offset, f"truncated record ({len(body)} of {length + 4} bytes)")
        data = body[:length]
        (data_crc,) = struct.unpack("<I", body[length:])
        if _masked_crc(data) != data_crc:
            raise RecordError(offset, "data checksum mismatch (corrupt record)")
        yield offset, data
        offset += 16 + length


@dataclasses.dataclass
class ParsedExample:
    """What weakloc takes from one tf.train.Example.

    image_id: source_id, else filename, else None (the caller falls back to shard:index).
    labels: image-level class ids (as stored, int64); label_texts: their names, may be empty.
    gt_boxes: float32 (n, 4) normalised x0y0x1y1 (as stored); gt_labels, gt_texts: per box.
    """

    encoded: bytes
    image_id: str | None
    labels: list[int]
    label_texts: list[str]
    gt_boxes: list[list[float]]
    gt_labels: list[int]
    gt_texts: list[str]


def _feature_values(feature_map, key, kind):
    if key not in feature_map:
        return []
    feat = feature_map[key]
    which = feat.WhichOneof("kind")
    if which is None:
        return []
    if which != kind:
        raise ExampleError(f"feature {key!r} has type {which}, expected {kind}")
    return list(getattr(feat, kind).value)


def _text(values, key):
    out = []
    for v in values:
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ExampleError(f"feature {key!r} is not UTF-8 text") from exc
    return out


# tf.train.Example's schema (tensorflow/core/example/{example,feature}.proto: the same messages, field numbers and
# types), declared here so that workers parse records without importing TensorFlow: its example_pb2 lives inside
# the tensorflow package, and importing it runs all of TensorFlow's and Keras's start-up (3 s and 600 MB on a worker
# that runs OpenVINO). Its own pool, so it never meets TensorFlow's registration of the same names in one process.
_EXAMPLE_PROTO = """
name: "weakloc_example.proto" package: "weakloc.example" syntax: "proto3"
message_type { name: "BytesList" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT } }
message_type { name: "Int64List" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 } }
message_type { name: "Feature" oneof_decl { name: "kind" }
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".weakloc.example.BytesList" oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".weakloc.example.FloatList" oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".weakloc.example.Int64List" oneof_index: 0 } }
message_type { name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".weakloc.example.Features.FeatureEntry" }
  nested_type { name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".weakloc.example.Feature" } } }
message_type { name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".weakloc.example.Features" } }
"""


@functools.lru_cache(maxsize=None)
def example_message():
    """The tf.train.Example message class, built from `_EXAMPLE_PROTO` with protobuf alone (once per process)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(_EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("weakloc.example.Example"))


def parse_example(data: bytes) -> ParsedExample:
    """Parse a serialized tf.train.Example.

    Raises:
      ExampleError: the bytes do not parse, a feature has the wrong type, or image/encoded is missing or empty.
    """
    ex = example_message()()
    try:
        ex.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ExampleError(f"not a tf.train.Example: {type(exc).__name__}: {exc}") from exc
    fm = ex.features.feature
    encoded = _feature_values(fm, KEY_ENCODED, "bytes_list")
    if not encoded or not encoded[0]:
        raise ExampleError(f"missing or empty {KEY_ENCODED!r}")
    image_id = None
    for key in (KEY_SOURCE_ID, KEY_FILENAME):
        vals = _text(_feature_values(fm, key, "bytes_list"), key)
        if vals and vals[0]:
            image_id = vals[0]
            break
    coords = [_feature_values(fm, k, "float_list") for k in KEY_BBOX]
    if len({len(c) for c in coords}) != 1:
        raise ExampleError(f"bbox coordinate lists differ in length: {[len(c) for c in coords]}")
    gt_boxes = [list(b) for b in zip(*coords)]
    return ParsedExample(
        encoded=encoded[0],
        image_id=image_id,
        labels=[int(v) for v in _feature_values(fm, KEY_CLASS_LABEL, "int64_list")],
        label_texts=_text(_feature_values(fm, KEY_CLASS_TEXT, "bytes_list"), KEY_CLASS_TEXT),
        gt_boxes=gt_boxes,
        gt_labels=[int(v) for v in _feature_values(fm, KEY_OBJ_LABEL, "int64_list")],
        gt_texts=_text(_feature_values(fm, KEY_OBJ_TEXT, "bytes_list"), KEY_OBJ_TEXT),
    )


def make_example(
    encoded: bytes,
    *,
    source_id: str | None = None,
    filename: str | None = None,
    labels: list[int] = (),
    label_texts: list[str] = (),
    boxes: list[list[float]] = (),
    box_labels: list[int] = (),
    box_texts: list[str] = (),
    width: int | None = None,
    height: int | None = None,
    image_format: str = "",
) -> bytes:
    """Serialize a tf.train.Example in the same convention (used by dataset builders and tests)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def b(vals):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=list(vals)))

    def i(vals):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v) for v in vals]))

    def f(vals):
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(v) for v in vals]))

    feats = {KEY_ENCODED: b([encoded])}
    if source_id is not None:
        feats[KEY_SOURCE_ID] = b([source_id.encode()])
    if filename is not None:
        feats[KEY_FILENAME] = b([filename.encode()])
    if image_format:
        feats["image/format"] = b([image_format.encode()])
    if width is not None:
        feats["image/width"] = i([width])
    if height is not None:
        feats["image/height"] = i([height])
    if labels:
        feats[KEY_CLASS_LABEL] = i(labels)
    if label_texts:
        feats[KEY_CLASS_TEXT] = b([t.encode() for t in label_texts])
    if len(boxes):
        for j, key in enumerate(KEY_BBOX):
            feats[key] = f([bx[j] for bx in boxes])
        if box_labels:
            feats[KEY_OBJ_LABEL] = i(box_labels)
        if box_texts:
            feats[KEY_OBJ_TEXT] = b([t.encode() for t in box_texts])
    return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString()
