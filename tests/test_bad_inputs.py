"""Bad inputs become failure rows and the run completes, with counts that add up.

One run over image files and one over TFRecord shards, each mixing good inputs with every kind of damage; the
expected rows come from how each input was made. The real truncated kangaroo photo is checked separately (it
lives in ../shared and skips without it).
"""
from __future__ import annotations

import gzip
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results

from tests.helpers import RUNNER, shared_path


def run(*argv: str) -> dict:
    return label.run([*argv, f"--runner={RUNNER}"])


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def check_counts(summary: dict, annotated: int, failed: int, by_stage: dict):
    counts = summary["counts"]
    assert counts["annotated"] == annotated
    assert counts["failed"] == failed
    assert counts["read"] == counts["annotated"] + counts["failed"] == annotated + failed
    assert counts["failed_by_stage"] == by_stage


# --------------------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("bad_images")
    d = root / "in"
    d.mkdir()
    data = synthetic.make_shapes(4, size=48, seed=21)
    good = {
        d / "good0.png": synthetic.encode_png(data.images[0]),
        d / "good1.png": synthetic.encode_png(data.images[1]),
        d / "good2.jpg": jpeg_bytes(data.images[2]),
    }
    whole = jpeg_bytes(data.images[3])
    with Image.open(io.BytesIO(whole[: len(whole) // 2])) as im:  # the cut file still has a valid header
        assert im.format == "JPEG"
    bad = {  # path -> substring expected in the failure message
        d / "random.jpg": (np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                           "not a recognised image format"),
        d / "empty.png": (b"", "empty"),
        d / "cut.jpg": (whole[: len(whole) // 2], "truncated"),
        d / "notes.txt": (b"these are not pixels\n" * 20, "not a recognised image format"),
    }
    for path, payload in good.items():
        path.write_bytes(payload)
    for path, (payload, _) in bad.items():
        path.write_bytes(payload)
    out = root / "out"
    summary = run("--input", str(d / "*"), "--input_format", "images", "--model", tiny_model_path,
                  "--output", str(out))
    return {
        "summary": summary,
        "good": {str(p) for p in good},
        "bad": {str(p): why for p, (_, why) in bad.items()},
        "annotations": results.read_table(str(out)).to_pylist(),
        "failures": results.read_table(str(out), "failures").to_pylist(),
    }


def test_images_good_ones_annotated(image_run):
    rows = image_run["annotations"]
    assert sorted(r["image_id"] for r in rows) == sorted(image_run["good"])
    for r in rows:
        assert (r["width"], r["height"]) == (48, 48)
        assert len(r["boxes"]) == 1


def test_images_each_bad_file_is_one_failure_row(image_run):
    fails = {f["source"]: f for f in image_run["failures"]}
    assert len(fails) == len(image_run["failures"])
    assert set(fails) == set(image_run["bad"])
    for path, why in image_run["bad"].items():
        f = fails[path]
        assert f["stage"] == "decode"
        assert f["error"] == "ImageDecodeError"
        assert f["image_id"] == path
        assert why in f["message"].lower(), f["message"]


def test_images_counts_add_up(image_run):
    check_counts(image_run["summary"], annotated=3, failed=4, by_stage={"decode": 4})


def test_real_truncated_kangaroo_photo(tiny_model_path, tmp_path):
    images_dir = shared_path("photos", "kangaroo", "images")
    truncated = images_dir / "00090.jpg"
    with Image.open(truncated) as im:  # the data's own damage, independently of weakloc
        with pytest.raises(OSError, match="truncated"):
            im.load()
    good = sorted(p for p in images_dir.glob("*.jpg") if p != truncated)[0]
    with Image.open(good) as im:
        im.load()
        size = im.size
    out = tmp_path / "out"
    summary = run("--input", str(truncated), "--input", str(good), "--model", tiny_model_path, "--output", str(out))
    check_counts(summary, annotated=1, failed=1, by_stage={"decode": 1})
    (row,) = results.read_table(str(out)).to_pylist()
    assert row["image_id"] == str(good)
    assert (row["width"], row["height"]) == size
    (fail,) = results.read_table(str(out), "failures").to_pylist()
    assert fail["source"] == fail["image_id"] == str(truncated)
    assert (fail["stage"], fail["error"]) == ("decode", "ImageDecodeError")
    assert "truncated" in fail["message"]


# --------------------------------------------------------------------------------------------------------------
# TFRecord shards
# --------------------------------------------------------------------------------------------------------------


def _example_without_image(source_id: str) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    feats = {"image/source_id": feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[source_id.encode()]))}
    return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString()


@pytest.fixture(scope="module")
def tfrecord_run(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("bad_shards")
    d = root / "in"
    d.mkdir()
    data = synthetic.make_shapes(20, size=40, seed=22)
    pngs = iter(synthetic.encode_png(img) for img in data.images)

    def good(i):
        return records.frame_record(records.make_example(next(pngs), source_id=f"good-{i}"))

    good_ids, read_fails = [], {}  # read_fails: shard path -> (good records before the damage, message part)
    parse_fails, decode_fails = {}, {}  # source -> (image_id, message part)

    # 1. Intact shard mixing good and bad records.
    mixed = d / "mixed.tfrecord"
    frames = [
        good(0),
        records.frame_record(_example_without_image("no-pixels")),
        records.frame_record(b"\xff\xff\xff\xff not a protobuf"),
        records.frame_record(records.make_example(b"GIF89a but not really", source_id="bad-pixels")),
        good(1),
    ]
    good_ids += ["good-0", "good-1"]
    parse_fails[f"{mixed}:1"] = (None, "image/encoded")
    parse_fails[f"{mixed}:2"] = (None, "not a tf.train.example")
    decode_fails[f"{mixed}:3"] = ("bad-pixels", "")
    mixed.write_bytes(b"".join(frames))

    # 2. Truncated in the middle of its 4th record.
    cut = d / "cut.tfrecord"
    last = good(99)
    cut.write_bytes(good(2) + good(3) + good(4) + last[: len(last) // 2])
    good_ids += ["good-2", "good-3", "good-4"]
    read_fails[str(cut)] = (3, "truncated")

    # 3. Bad data CRC on the 3rd record; the good record after it is never reached.
    crc = d / "crc.tfrecord"
    damaged = bytearray(good(98))
    damaged[-1] ^= 0xFF
    crc.write_bytes(good(5) + good(6) + bytes(damaged) + good(97))
    good_ids += ["good-5", "good-6"]
    read_fails[str(crc)] = (2, "checksum")

    # 4. Not a TFRecord at all (a PNG named .tfrecord).
    alien = d / "alien.tfrecord"
    alien.write_bytes(synthetic.encode_png(data.images[0]))
    read_fails[str(alien)] = (0, "checksum")

    # 5. A GZIP shard whose compressed stream is cut mid-record: the records it still holds in full are read.
    gz = d / "gz.tfrecord"
    gz_frames = [good(i) for i in range(7, 11)]
    blob = gzip.compress(b"".join(gz_frames))
    blob = blob[: int(len(blob) * 0.7)]
    gz.write_bytes(blob)
    recovered = zlib.decompressobj(wbits=31).decompress(blob)  # what any gzip reader can still get
    n_whole, pos = 0, 0
    while pos + 12 <= len(recovered):
        (length,) = struct.unpack("<Q", recovered[pos: pos + 8])
        if pos + 16 + length > len(recovered):
            break
        n_whole, pos = n_whole + 1, pos + 16 + length
    assert 1 <= n_whole < 4 and pos < len(recovered)  # the cut is inside a record
    good_ids += [f"good-{i}" for i in range(7, 7 + n_whole)]
    read_fails[str(gz)] = (n_whole, "")

    # 6. A GZIP shard cut exactly after its 2nd record (a partial copy): no end-of-stream marker, no trailer.
    gzb = d / "gzb.tfrecord"
    comp = zlib.compressobj(wbits=31)
    parts = [comp.compress(f) + comp.flush(zlib.Z_FULL_FLUSH) for f in (good(11), good(12), good(96))]
    gzb.write_bytes(parts[0] + parts[1])
    good_ids += ["good-11", "good-12"]
    read_fails[str(gzb)] = (2, "")

    # 7. Not damaged: two gzip members back to back (what `cat a.gz b.gz` gives) read as one shard.
    multi = d / "multi.tfrecord"
    multi.write_bytes(gzip.compress(good(13)) + gzip.compress(good(14)))
    good_ids += ["good-13", "good-14"]

    out = root / "out"
    summary = run("--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--output", str(out))
    # every record we expect read, plus one row per damaged shard for its unread tail
    made = 5 + (3 + 1) + (2 + 1) + 1 + (n_whole + 1) + (2 + 1) + 2
    return {
        "summary": summary,
        "made": made,
        "good_ids": good_ids,
        "read_fails": read_fails,
        "parse_fails": parse_fails,
        "decode_fails": decode_fails,
        "annotations": results.read_table(str(out)).to_pylist(),
        "failures": results.read_table(str(out), "failures").to_pylist(),
    }


def test_tfrecord_good_records_annotated_including_those_before_damage(tfrecord_run):
    assert sorted(r["image_id"] for r in tfrecord_run["annotations"]) == sorted(tfrecord_run["good_ids"])


def test_tfrecord_damaged_shards_one_read_failure_each(tfrecord_run):
    reads = {f["source"]: f for f in tfrecord_run["failures"] if f["stage"] == "read"}
    assert len(reads) == sum(f["stage"] == "read" for f in tfrecord_run["failures"])
    assert set(reads) == set(tfrecord_run["read_fails"])
    for shard, (n_good, part) in tfrecord_run["read_fails"].items():
        f = reads[shard]
        assert f["image_id"] is None
        assert f["error"] in ("RecordError", "EOFError"), f  # bad framing, or a gzip stream that ends early
        assert re.search(rf"after {n_good} (good )?records", f["message"]), f["message"]
        assert part in f["message"].lower()


def test_tfrecord_bad_records_fail_at_parse_or_decode(tfrecord_run):
    rows = {f["source"]: f for f in tfrecord_run["failures"] if f["stage"] != "read"}
    expected = {**tfrecord_run["parse_fails"], **tfrecord_run["decode_fails"]}
    assert set(rows) == set(expected)
    for source, (image_id, part) in expected.items():
        f = rows[source]
        if source in tfrecord_run["parse_fails"]:
            assert (f["stage"], f["error"]) == ("parse", "ExampleError")
        else:
            assert (f["stage"], f["error"]) == ("decode", "ImageDecodeError")
        assert f["image_id"] == image_id
        assert part in f["message"].lower()


def test_tfrecord_counts_add_up(tfrecord_run):
    n_ann = len(tfrecord_run["good_ids"])
    by_stage = {
        "read": len(tfrecord_run["read_fails"]),
        "parse": len(tfrecord_run["parse_fails"]),
        "decode": len(tfrecord_run["decode_fails"]),
    }
    check_counts(tfrecord_run["summary"], annotated=n_ann, failed=sum(by_stage.values()), by_stage=by_stage)
    assert tfrecord_run["summary"]["counts"]["read"] == tfrecord_run["made"]
    assert len(tfrecord_run["annotations"]) + len(tfrecord_run["failures"]) == tfrecord_run["made"]


# --------------------------------------------------------------------------------------------------------------
# File names that are not UTF-8 (Linux allows any bytes): a failure row each, the run goes on.
# --------------------------------------------------------------------------------------------------------------


def test_non_utf8_file_names_become_read_failures(tiny_model_path, tmp_path):
    import os

    d = tmp_path / "in"
    d.mkdir()
    data = synthetic.make_shapes(2, size=40, seed=23)
    (d / "good.png").write_bytes(synthetic.encode_png(data.images[0]))
    bad = os.path.join(os.fsencode(d), b"caf\xe9-latin1.png")  # "cafe" with e-acute in Latin-1, not UTF-8
    with open(bad, "wb") as f:
        f.write(synthetic.encode_png(data.images[1]))
    out = tmp_path / "out"
    # Two overlapping patterns: the bad name still gives one row.
    summary = run("--input", str(d / "*.png"), "--input", str(d / "caf*"), "--input_format", "images",
                  "--model", tiny_model_path, "--output", str(out))
    check_counts(summary, annotated=1, failed=1, by_stage={"read": 1})
    (fail,) = results.read_table(str(out), "failures").to_pylist()
    assert fail["source"] == str(d / "caf\\xe9-latin1.png")
    assert (fail["stage"], fail["error"], fail["image_id"]) == ("read", "UnicodeEncodeError", None)
    assert "not valid UTF-8" in fail["message"]
    (row,) = results.read_table(str(out)).to_pylist()
    assert row["image_id"] == str(d / "good.png")


def test_fifo_matched_by_the_pattern_is_a_read_failure_not_a_hang(tiny_model_path, tmp_path):
    import os

    d = tmp_path / "in"
    d.mkdir()
    data = synthetic.make_shapes(1, size=40, seed=24)
    (d / "good.png").write_bytes(synthetic.encode_png(data.images[0]))
    os.mkfifo(d / "pipe.png")  # opening it for reading would block forever: no writer
    out = tmp_path / "out"
    summary = run("--input", str(d / "*.png"), "--model", tiny_model_path, "--output", str(out))
    check_counts(summary, annotated=1, failed=1, by_stage={"read": 1})
    (fail,) = results.read_table(str(out), "failures").to_pylist()
    assert (fail["source"], fail["error"]) == (str(d / "pipe.png"), "NotARegularFile")
