"""Property-based fuzzing (hypothesis) of the parse and decode steps: zero uncaught exceptions, every input
accounted for.

Inputs are random bytes and mutations (byte flips, cuts, splices, insertions) of valid seeds in every format
weakloc decodes, of valid tf.train.Examples and of valid TFRecord streams. CI runs a bounded, derandomised
number of cases; the longer run in RELIABILITY.md sets WEAKLOC_FUZZ_EXAMPLES (and WEAKLOC_FUZZ_SEED=random).
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from weakloc.models import images, records, synthetic
from weakloc.transforms.decode import DecodedInput, DecodeDoFn
from weakloc.models.reading import RawInput
from weakloc.transforms.tags import FAILURES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow narrates corrupt TIFF/EXIF it survives
EXAMPLES = int(os.environ.get("WEAKLOC_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("WEAKLOC_FUZZ_SEED") != "random",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = []
    for fmt, img, kw in [
        ("JPEG", base, {"exif": exif.tobytes()}),
        ("JPEG", base.convert("CMYK"), {}),
        ("PNG", base, {}),
        ("PNG", Image.fromarray((np.arange(60, dtype=np.uint16).reshape(6, 10) * 900), mode="I;16"), {}),
        ("PNG", base.convert("RGBA"), {}),
        ("GIF", base, {"save_all": True, "append_images": [base.rotate(90)]}),
        ("BMP", base, {}),
        ("WEBP", base, {}),
        ("TIFF", base, {"exif": exif.tobytes()}),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SEED_IMAGES = _seed_images()
SEED_EXAMPLE = records.make_example(
    SEED_IMAGES[2], source_id="seed", labels=[1], label_texts=["dog"], boxes=[[0.1, 0.2, 0.6, 0.9]],
    box_labels=[1], box_texts=["dog"], width=20, height=12)


@st.composite
def mutated(draw, seeds: list[bytes]):
    """A seed with a few random edits: flip, overwrite, cut, insert, splice."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos: pos + len(chunk)] = chunk
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos: pos + draw(st.integers(1, 64))]
    return bytes(data)


IMAGE_BYTES = st.one_of(st.binary(max_size=2048), mutated(SEED_IMAGES))


@FUZZ
@given(IMAGE_BYTES)
def test_decode_returns_a_picture_or_a_decode_error(data):
    try:
        out = images.decode_image(data, (8, 8))
    except images.ImageDecodeError as exc:
        assert exc.reason in {"empty", "unrecognised", "unreadable", "too_large", "corrupt"}
        event(f"refused: {exc.reason}")
        return
    event(f"decoded: {out.format}")
    assert out.pixels.shape == (8, 8, 3) and out.pixels.dtype == np.uint8
    assert out.width >= 1 and out.height >= 1


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated([SEED_EXAMPLE])))
def test_parse_returns_an_example_or_an_example_error(data):
    try:
        ex = records.parse_example(data)
    except records.ExampleError:
        event("refused")
        return
    event("parsed")
    assert isinstance(ex.encoded, bytes) and ex.encoded
    assert all(len(b) == 4 for b in ex.gt_boxes)


@pytest.fixture(scope="module")
def decode_fn():
    fn = DecodeDoFn((8, 8), ("cat", "dog", "bird"), max_pixels=1_000_000, threads=0)  # one output per call
    fn.setup()
    return fn


@FUZZ
@given(kind=st.sampled_from(["image", "example"]), image=IMAGE_BYTES,
       example=st.one_of(mutated([SEED_EXAMPLE]), st.binary(max_size=256)))
def test_decode_step_accounts_for_every_input_exactly_once(decode_fn, kind, image, example):
    if kind == "image":
        raw = RawInput(source="f.png", kind="image", payload=image, image_id="f.png", folder_label="dog")
    else:
        raw = RawInput(source="s.tfrecord:0", kind="example", payload=example)
    (out,) = list(decode_fn.process(raw))  # exactly one output: a picture or a failure row
    event(f"{kind}: " + ("annotated" if isinstance(out, DecodedInput) else f"failed at {out.value['stage']}"))
    if isinstance(out, DecodedInput):
        assert out.pixels.shape == (8, 8, 3) and out.meta.source == raw.source
    else:
        assert out.tag == FAILURES
        assert out.value["source"] == raw.source and out.value["stage"] in ("parse", "decode")


def _frames(n: int) -> tuple[list[bytes], bytes]:
    payloads = [records.make_example(synthetic.encode_png(np.full((4, 4, 3), i, np.uint8)), source_id=str(i))
                for i in range(n)]
    return payloads, b"".join(records.frame_record(p) for p in payloads)


PAYLOADS, STREAM = _frames(4)


@FUZZ
@given(mutated([STREAM]))
def test_damaged_stream_yields_an_intact_prefix_then_one_record_error(data):
    got = []
    try:
        for offset, payload in records.iter_records(io.BytesIO(data), max_record_bytes=1 << 20):
            got.append((offset, payload))
    except records.RecordError as exc:
        assert 0 <= exc.offset <= len(data)
        event(f"damaged after {len(got)} records")
    else:
        # A clean end is only possible at a frame boundary of what was read.
        assert sum(16 + len(p) for _, p in got) == len(data)
    # Every record that came out is one of the originals, in order: a damaged frame never passes its CRC (a
    # collision is a 2^-32 event), though a deletion that removes exactly one whole frame leaves the rest valid.
    indices = [PAYLOADS.index(p) for _, p in got]
    assert indices == sorted(set(indices))
