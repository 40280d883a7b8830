"""Decoding (formats, modes, EXIF, limits), TFRecord framing and Example parsing, sidecars, thresholds, labels."""
import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from weakloc.models import annotate, images, records, sidecar


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _left_red_half(w=40, h=20):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_formats_decode_to_rgb_at_input_size(fmt):
    data = _encode(_left_red_half(), fmt)
    out = images.decode_image(data, (10, 16))
    assert out.pixels.shape == (10, 16, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (40, 20)
    assert out.pixels[:, :6, 0].mean() > 180 and out.pixels[:, 10:, 0].mean() < 60  # red stays on the left


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG"), ("1", "PNG")],
)
def test_modes_become_rgb(mode, fmt):
    img = _left_red_half().convert("L").convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300), mode="I;16")
    out = images.decode_image(_encode(img, fmt), (8, 8))
    assert out.pixels.shape == (8, 8, 3)


def test_sixteen_bit_png_uses_full_range():
    arr = np.zeros((4, 8), np.uint16)
    arr[:, 4:] = 65535
    out = images.decode_image(_encode(Image.fromarray(arr, mode="I;16"), "PNG"), (4, 8), draft=False)
    assert out.pixels[:, :3].max() == 0 and out.pixels[:, 5:].min() == 255


def test_transparent_pixels_composite_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    out = images.decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), (4, 4))
    assert out.pixels.min() == 255


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = images.decode_image(buf.getvalue(), (8, 8))
    assert out.pixels[..., 0].mean() > 200 and out.pixels[..., 2].mean() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    # A 40x20 picture, red in its left half as stored; a viewer applies the EXIF transform.
    img = _left_red_half()
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = images.decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95), (20, 20), draft=False)
    expected = np.asarray(img.transpose(_TRANSPOSE[orientation]) if orientation > 1 else img)
    assert (out.height, out.width) == expected.shape[:2]
    resized = np.asarray(Image.fromarray(expected).resize((20, 20), Image.Resampling.BILINEAR))
    assert np.abs(out.pixels.astype(int) - resized.astype(int)).mean() < 12


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_rotated_size_is_the_viewers_in_every_format(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = images.decode_image(_encode(_left_red_half(40, 20), fmt, exif=exif.tobytes()), (8, 8))
    assert (out.width, out.height) == (20, 40)


def test_dark_sixteen_bit_stays_dark():
    arr = np.full((4, 4), 256 * 50, np.uint16)  # about 20% grey in 16 bits
    out = images.decode_image(_encode(Image.fromarray(arr, mode="I;16"), "PNG"), (4, 4), draft=False)
    assert abs(int(out.pixels.mean()) - 50) <= 1


def test_jpeg_draft_keeps_true_size_and_content():
    big = _left_red_half(800, 600)
    out = images.decode_image(_encode(big, "JPEG", quality=90), (32, 32), draft=True)
    assert (out.width, out.height) == (800, 600)
    assert out.pixels[:, :14, 0].mean() > 200 and out.pixels[:, 18:, 0].mean() < 40


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "unrecognised"),
        (bytes(range(256)) * 4, "unrecognised"),
    ],
)
def test_bad_bytes_raise_decode_error(data, reason):
    with pytest.raises(images.ImageDecodeError) as info:
        images.decode_image(data, (8, 8))
    assert info.value.reason == reason


def test_truncated_and_corrupt_bodies_raise_decode_error():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = _encode(noisy, fmt)
        with pytest.raises(images.ImageDecodeError):
            images.decode_image(data[: len(data) // 2], (8, 8), draft=False)
        corrupt = data[:40] + bytes(len(data) - 40)
        with pytest.raises(images.ImageDecodeError):
            images.decode_image(corrupt, (8, 8), draft=False)


def test_pixel_limit_refuses_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")  # a few KB that claim 9 MP
    with pytest.raises(images.ImageDecodeError) as info:
        images.decode_image(data, (8, 8), max_pixels=1_000_000)
    assert info.value.reason == "too_large" and "3000x3000" in str(info.value)


def test_tfrecord_framing_round_trip_matches_tensorflow(tmp_path):
    import tensorflow as tf

    payloads = [b"a", b"", b"x" * 1000]
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    with open(path, "rb") as f:
        raw = f.read()
    assert raw == b"".join(records.frame_record(p) for p in payloads)  # our frames are TF's frames
    assert [d for _, d in records.iter_records(io.BytesIO(raw))] == payloads
    assert [o for o, _ in records.iter_records(io.BytesIO(raw))] == [0, 17, 33]


def test_damaged_stream_yields_good_records_then_error_with_offset():
    good = records.frame_record(b"one") + records.frame_record(b"two")
    third = records.frame_record(b"three")
    for damaged, where in [
        (good + third[:-3], len(good)),  # truncated mid-record
        (good + third[:14] + b"X" + third[15:], len(good)),  # data flipped: data CRC mismatch
        (good + b"\x00" * 5, len(good)),  # truncated header
    ]:
        got = []
        with pytest.raises(records.RecordError) as info:
            for _, d in records.iter_records(io.BytesIO(damaged)):
                got.append(d)
        assert got == [b"one", b"two"] and info.value.offset == where


def test_parse_example_fields_and_errors():
    ex = records.make_example(b"IMG", filename="f.jpg", labels=[2], label_texts=["dog"],
                              boxes=[[0.1, 0.2, 0.5, 0.6]], box_labels=[2], box_texts=["dog"])
    parsed = records.parse_example(ex)
    assert parsed.encoded == b"IMG" and parsed.image_id == "f.jpg"
    assert parsed.labels == [2] and parsed.label_texts == ["dog"]
    np.testing.assert_allclose(parsed.gt_boxes, [[0.1, 0.2, 0.5, 0.6]], rtol=1e-6)
    assert records.parse_example(records.make_example(b"I", source_id="s", filename="f")).image_id == "s"
    with pytest.raises(records.ExampleError, match="missing or empty 'image/encoded'"):
        records.parse_example(records.make_example(b""))
    with pytest.raises(records.ExampleError, match="not a tf.train.Example"):
        records.parse_example(b"\xff\xff\xff garbage")
    from tensorflow.core.example import example_pb2, feature_pb2

    wrong = example_pb2.Example(features=feature_pb2.Features(feature={
        "image/encoded": feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[1]))}))
    with pytest.raises(records.ExampleError, match="has type int64_list, expected bytes_list"):
        records.parse_example(wrong.SerializeToString())


def test_example_schema_is_tensorflows_and_parsing_never_imports_it():
    from google.protobuf import json_format
    from tensorflow.core.example import example_pb2, feature_pb2

    # The same messages, field numbers, types and labels as TensorFlow's own declaration.
    ours = records.example_message().DESCRIPTOR.file
    for theirs in (example_pb2.DESCRIPTOR, feature_pb2.DESCRIPTOR):
        for name, message in theirs.message_types_by_name.items():
            if name not in ours.message_types_by_name:
                continue  # SequenceExample and its FeatureLists: never read here
            mine = ours.message_types_by_name[name]
            assert {f.name: (f.number, f.type, f.is_repeated) for f in mine.fields} == \
                   {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}, name
    assert set(ours.message_types_by_name) == {"BytesList", "FloatList", "Int64List", "Feature", "Features", "Example"}
    # Records TensorFlow wrote read back as TensorFlow reads them.
    data = records.make_example(b"\xff\xd8IMG", source_id="s1", labels=[2, 7], label_texts=["dog", "caf\u00e9"],
                                boxes=[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], box_labels=[2, 7],
                                box_texts=["dog", "cat"])
    mine, theirs = records.example_message()(), example_pb2.Example()
    mine.ParseFromString(data)
    theirs.ParseFromString(data)
    assert json_format.MessageToDict(mine) == json_format.MessageToDict(theirs)
    assert mine.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    # A worker parsing records imports no TensorFlow (its import is a worker's largest start-up cost).
    code = ("import sys; from weakloc.models import records; "
            f"p = records.parse_example({data!r}); assert p.labels == [2, 7], p; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]"]


def test_sidecar_resolution_and_mismatch_errors():
    doc = {"input_size": [32, 48], "scale": 2, "offset": -1, "class_names": ["a", "b"], "trained_on": "x"}
    prep = sidecar.resolve_preprocessing(doc, model_input_size=(32, 48), num_classes=2)
    assert prep.input_size == (32, 48) and prep.scale == 2.0 and prep.extra == {"trained_on": "x"}
    assert json.loads(sidecar.dumps(prep))["trained_on"] == "x"  # unknown keys survive a rewrite
    over = sidecar.resolve_preprocessing(doc, overrides={"scale": 0.5, "class_names": ("p", "q")},
                                         model_input_size=(32, 48), num_classes=2)
    assert over.scale == 0.5 and over.class_names == ("p", "q")
    with pytest.raises(sidecar.SidecarError, match="class_names has 2 names but the model predicts 3"):
        sidecar.resolve_preprocessing(doc, model_input_size=(32, 48), num_classes=3)
    with pytest.raises(sidecar.SidecarError, match=r"input_size \[32, 48\] does not match the model's input \[64, 64\]"):
        sidecar.resolve_preprocessing(doc, model_input_size=(64, 64), num_classes=2)
    with pytest.raises(sidecar.SidecarError, match="any input size"):
        sidecar.resolve_preprocessing({}, model_input_size=(None, None), num_classes=2)
    with pytest.raises(sidecar.SidecarError, match="unique"):
        sidecar.parse_sidecar({"class_names": ["a", "a"]})
    assert sidecar.sidecar_path("gs://b/models/cls.keras") == "gs://b/models/cls.json"


def test_thresholds_file_parsing():
    from weakloc.models.thresholds import Thresholds, ThresholdsError

    names = ("cat", "dog")
    doc = Thresholds.from_json({"default": 0.4, "per_class": {"dog": 0.6}})
    assert (doc.default, doc.class_ids(names)) == (0.4, {1: 0.6})
    other = Thresholds.from_json('{"per_class": {}, "curve": [1, 2]}')
    assert (other.default, other.class_ids(names), dict(other.extra)) == (None, {}, {"curve": [1, 2]})
    with pytest.raises(ThresholdsError, match="within \\[0, 1\\]"):
        Thresholds.from_json({"default": 1.5})
    with pytest.raises(ThresholdsError, match="not classes of the model"):
        Thresholds.from_json({"per_class": {"cow": 0.5}}).class_ids(names)
    with pytest.raises(ThresholdsError, match="true or false"):
        Thresholds.from_json({"cam_contrast": "yes"})
    with pytest.raises(ThresholdsError, match="two factors"):
        Thresholds.from_json({"box_stretch": [1.2]})


def test_thresholds_file_round_trip_keeps_every_key():
    from weakloc.models import refine
    from weakloc.models.thresholds import Thresholds

    f = 2 + 4 * 2
    refiner = {"taus": [0.3, 0.6], "alpha": 1.0, "mean": [0.0] * f, "scale": [1.0] * f, "coef": [[0.0] * 4] * (f + 1)}
    doc = {"default": 0.3, "per_class": {"dog": 0.5}, "cam_contrast": True, "box_stretch": [0.9, 1.2],
           "box_refine": refiner, "box_refine_fit": {"kept": True}, "calibration": {"images": 7},
           "written_by": "a later weakloc"}
    parsed = Thresholds.from_json(doc)
    assert isinstance(parsed.box_refine, refine.BoxRefiner) and parsed.box_stretch == (0.9, 1.2)
    assert parsed.to_json() == doc
    assert Thresholds.from_json(parsed.to_json()).to_json() == doc


def test_label_resolution_prefers_text_and_handles_offsets():
    names = ("cat", "dog", "bird")
    assert annotate.resolve_labels([0], ["bird"], names) == ([2], ["bird"])  # text wins
    assert annotate.resolve_labels([1], [], names) == ([1], ["dog"])
    assert annotate.resolve_labels([1], [], names, id_offset=1) == ([0], ["cat"])  # 1-based label maps
    assert annotate.resolve_labels([7], ["cow"], names) == ([-1], ["cow"])  # unknown: kept, no CAM


def test_gzip_detection_needs_no_extension(tmp_path):
    from weakloc.models.files import open_maybe_gzip

    raw = records.frame_record(b"r1") + records.frame_record(b"r2")
    path = tmp_path / "shard.tfrecord"
    path.write_bytes(gzip.compress(raw))
    with open_maybe_gzip(str(path)) as f:
        assert [d for _, d in records.iter_records(f)] == [b"r1", b"r2"]
