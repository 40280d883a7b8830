"""Decoding ahead in a thread pool (issue 6) changes when outputs appear, never what they are.

The reference is the same DoFn with `threads=0`, which decodes each input in the calling thread and yields its
outputs at once; the threaded DoFn must give the same pictures, failure rows and skipped ids, each input's
outputs in its own window and timestamp, and nothing left behind when the bundle ends.
"""
from __future__ import annotations

import hashlib
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results
from weakloc.transforms.decode import DecodedInput, DecodeDoFn
from weakloc.models.reading import RawInput
from weakloc.transforms.tags import FAILURES, SKIPPED

from tests.helpers import RUNNER

CLASSES = ("cat", "dog", "bird")


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _inputs() -> list[RawInput]:
    """Good and broken inputs interleaved, of every kind the decode step sees."""
    pics = synthetic.make_shapes(8, size=40, seed=5).images
    whole = _jpeg(pics[0])
    out = []
    for i in range(8):
        out.append(RawInput(f"img{i}.png", "image", synthetic.encode_png(pics[i]), image_id=f"img{i}.png",
                            folder_label=CLASSES[i % 3]))
        out.append(RawInput(f"s.tfrecord:{i}", "example",
                            records.make_example(_jpeg(pics[i]), source_id=f"ex{i}", label_texts=[CLASSES[i % 3]],
                                                 boxes=[[0.1, 0.2, 0.5, 0.6]], box_texts=["dog"])))
    out[3:3] = [
        RawInput("cut.jpg", "image", whole[: len(whole) // 2], image_id="cut.jpg"),  # decode failure
        RawInput("noise.jpg", "image", bytes(range(256)) * 4, image_id="noise.jpg"),  # not an image
        RawInput("s.tfrecord:90", "example", b"\xff\xff not a protobuf"),  # parse failure
        RawInput("s.tfrecord:91", "example", records.make_example(b"GIF89a but not", source_id="badpix")),
        RawInput("s.tfrecord:92", "example", records.make_example(_jpeg(pics[1]), source_id="seen-before")),
        RawInput("empty.png", "image", b"", image_id="empty.png"),
    ]
    return out


def _key(out):
    """Something comparable and picklable for every kind of output."""
    if isinstance(out, DecodedInput):
        m = out.meta
        return ("image", m.image_id, m.source, m.width, m.height, tuple(m.label_ids), tuple(m.label_texts),
                tuple(map(tuple, m.gt_boxes)), tuple(m.gt_ids), hashlib.sha1(out.pixels.tobytes()).hexdigest())
    if out.tag == FAILURES:
        row = out.value
        return (FAILURES, row["source"], row["stage"], row["error"], row["message"], row["image_id"])
    return (out.tag, out.value)


def _sequential(inputs, skip_ids):
    fn = DecodeDoFn((24, 24), CLASSES, threads=0)
    fn.setup()
    fn.start_bundle()
    outs = [out for raw in inputs for out in fn.process(raw, skip_ids=skip_ids)]
    assert list(fn.finish_bundle() or []) == []
    return outs


SKIP = {"seen-before": None}


def test_reference_covers_every_outcome():
    keys = [_key(o) for o in _sequential(_inputs(), SKIP)]
    kinds = [k[0] for k in keys]
    assert kinds.count("image") == 16 and kinds.count(FAILURES) == 5 and kinds.count(SKIPPED) == 1
    assert sorted(k[2] for k in keys if k[0] == FAILURES) == ["decode", "decode", "decode", "decode", "parse"]


@pytest.mark.parametrize("window", [1, 3, 64])
def test_threaded_outputs_equal_sequential_in_input_order_with_their_own_timestamps(window):
    inputs = _inputs()
    expected = [_key(o) for o in _sequential(inputs, SKIP)]
    fn = DecodeDoFn((24, 24), CLASSES, threads=2, window=window)
    fn.setup()
    try:
        fn.start_bundle()
        got = []
        for i, raw in enumerate(inputs):
            got += list(fn.process(raw, window=GlobalWindow(), timestamp=Timestamp(i), skip_ids=SKIP))
            assert len(got) <= i + 1  # never ahead of the inputs; at most `window` behind
        got += list(fn.finish_bundle())
    finally:
        fn.teardown()
    values = []
    for out in got:
        tagged = isinstance(out, beam.pvalue.TaggedOutput)
        wv = out.value if tagged else out
        assert isinstance(wv, WindowedValue) and wv.windows == (GlobalWindow(),)
        values.append((wv.timestamp, beam.pvalue.TaggedOutput(out.tag, wv.value) if tagged else wv.value))
    # One output per input, in input order, each stamped with its own input's timestamp.
    assert [t for t, _ in values] == [Timestamp(i) for i in range(len(inputs))]
    assert [_key(v) for _, v in values] == expected


def test_threaded_decode_in_a_pipeline_gives_the_sequential_outputs():
    inputs = _inputs()
    expected = [_key(o) for o in _sequential(inputs, SKIP)]
    with beam.Pipeline(runner=RUNNER) as p:
        skip = beam.pvalue.AsDict(p | "Skip" >> beam.Create(list(SKIP.items())))
        outs = (p | beam.Create(inputs) | beam.ParDo(DecodeDoFn((24, 24), CLASSES, threads=2, window=3), skip)
                .with_outputs(FAILURES, SKIPPED, main="images"))
        for name, pc in (("image", outs.images), (FAILURES, outs[FAILURES]), (SKIPPED, outs[SKIPPED])):
            keyed = pc | f"Key{name}" >> beam.Map(
                lambda v, tag=name: _key(v) if tag == "image" else _key(beam.pvalue.TaggedOutput(tag, v)))
            assert_that(keyed, equal_to([k for k in expected if k[0] == name]), label=f"Check{name}")


def test_label_run_threaded_and_sequential_write_identical_tables(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for raw in _inputs():
        if raw.kind == "image":
            (d / raw.source).write_bytes(raw.payload)
    tables = {}
    for threads in ("0", "2"):
        out = tmp_path / f"out{threads}"
        summary = label.run(["--input", str(d / "*"), "--input_format", "images", "--model", tiny_model_path,
                             "--output", str(out), "--decode_threads", threads, "--batch_size", "3",
                             f"--runner={RUNNER}"])
        assert summary["counts"]["balanced"]
        ann = sorted(results.read_table(str(out)).to_pylist(), key=lambda r: r["image_id"])
        fail = sorted(results.read_table(str(out), "failures").to_pylist(), key=lambda r: r["source"])
        tables[threads] = (ann, fail, summary["counts"])
    assert len(tables["0"][0]) == 8 and len(tables["0"][1]) == 3
    assert tables["2"] == tables["0"]
