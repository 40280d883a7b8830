"""Hostile and odd image bytes at the decode step, exhaustively: every truncation point, corrupt bodies, a
decompression bomb under a hard memory cap, extreme shapes and odd modes, and wrong Example feature types.

The contract under test: `images.decode_image` returns a picture of the model input size or raises
`ImageDecodeError`, nothing else; `records.parse_example` returns or raises `ExampleError`.
"""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from weakloc.models import images, records

from tests.helpers import shared_path


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noisy(w=24, h=16, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _outcome(data: bytes, size=(8, 8)):
    """'ok' with a correct picture, or the ImageDecodeError reason; any other exception fails the test."""
    try:
        out = images.decode_image(data, size, draft=False)
    except images.ImageDecodeError as exc:
        return exc.reason
    assert out.pixels.shape == (*size, 3) and out.pixels.dtype == np.uint8
    return "ok"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_truncation_point_is_refused_or_decoded(fmt):
    data = _encode(_noisy(), fmt)
    assert _outcome(data) == "ok"
    outcomes = [_outcome(data[:n]) for n in range(len(data))]
    assert outcomes[0] == "empty"
    assert set(outcomes) <= {"empty", "unrecognised", "unreadable", "corrupt", "ok"}
    # Only a cut inside the last few bytes may still give the whole picture: a JPEG's EOI marker; a PNG's zlib
    # Adler-32, IDAT CRC and IEND chunk (4 + 4 + 12; Pillow checks neither checksum once the pixels are in).
    # Every cut that loses pixel data must be refused.
    tail = {"JPEG": 2, "PNG": 4 + 4 + 12}[fmt]
    assert "ok" not in outcomes[: len(data) - tail], [n for n, o in enumerate(outcomes) if o == "ok"][:5]


def test_real_photo_truncated_at_200_points():
    photo = sorted(shared_path("photos", "raccoon", "images").glob("*.jpg"))[0]
    data = photo.read_bytes()
    assert _outcome(data) == "ok"
    cuts = np.linspace(0, len(data) - 3, 200).astype(int)  # the last 2 bytes are the EOI marker
    outcomes = [_outcome(data[:n], (16, 16)) for n in cuts]
    assert "ok" not in outcomes, [int(n) for n, o in zip(cuts, outcomes) if o == "ok"]


@pytest.mark.parametrize("fmt, keep", [("JPEG", 0.25), ("PNG", 0.1), ("WEBP", 0.2), ("GIF", 0.4)])
@pytest.mark.parametrize("seed", range(5))
def test_valid_header_with_random_body(fmt, keep, seed):
    data = _encode(_noisy(64, 48, seed), fmt)
    k = int(len(data) * keep)
    body = np.random.default_rng(seed).integers(0, 256, len(data) - k, dtype=np.uint8).tobytes()
    with Image.open(io.BytesIO(data[:k] + body)) as im:  # Pillow still recognises the header
        assert im.format == fmt
    # Random bytes may happen to decode into some picture (JPEG, GIF are forgiving); either way, no escape.
    assert _outcome(data[:k] + body) in {"ok", "corrupt", "unreadable"}


def test_png_with_zeroed_idat_is_refused():
    data = _encode(_noisy(64, 48), "PNG")
    start = data.index(b"IDAT") + 4
    corrupt = data[:start] + bytes(len(data) - start - 12) + data[-12:]  # keep IEND
    assert _outcome(corrupt) == "corrupt"


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height white pixels: a few hundred KB that expand to width*height bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_decompression_bomb_refused_under_a_hard_memory_cap(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(50_000, 50_000))
    assert bomb.stat().st_size < 4_000_000  # 2.5 G pixels from a few hundred KB
    # A child process with a 1 GiB address-space cap: decoding would need 2.5 GB, so only a refusal from the
    # header can succeed. The default limit applies (no --max_pixels given).
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from weakloc.models import images
        data = open({str(bomb)!r}, "rb").read()
        def peak_kb():
            with open("/proc/self/status") as f:
                return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (it is inherited from the forking parent)
            f.write("5")
        before = peak_kb()
        try:
            images.decode_image(data, (32, 32))
        except images.ImageDecodeError as exc:
            print(exc.reason, exc)
            print("peak_kb", peak_kb() - before)
            sys.exit(0)
        sys.exit("decoded a 2.5 G pixel image")
    """)
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("too_large") and "2500000000 pixels" in proc.stdout
    peak_kb = int(proc.stdout.split("peak_kb")[1])
    assert peak_kb < 100_000  # the refusal's own resident peak, far below the 2.5 GB a decode would take


def test_bomb_can_be_refused_by_a_lower_limit_too():
    data = _encode(Image.new("1", (4000, 4000)), "PNG")
    with pytest.raises(images.ImageDecodeError, match="4000x4000 = 16000000 pixels"):
        images.decode_image(data, (8, 8), max_pixels=10_000_000)
    assert images.decode_image(data, (8, 8), max_pixels=16_000_000).width == 4000  # the limit is inclusive


@pytest.mark.parametrize("w, h", [(1, 1), (1, 10_000), (10_000, 1), (3, 7000)])
def test_extreme_shapes_decode_with_true_size(w, h):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2] = 255  # top half white
    out = images.decode_image(_encode(Image.fromarray(arr), "PNG"), (16, 16))
    assert (out.width, out.height) == (w, h)
    if h >= 2:
        assert out.pixels[:6].min() == 255 and out.pixels[10:].max() == 0


def test_cmyk_jpeg_colours_survive():
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = images.decode_image(_encode(cmyk, "JPEG", quality=95), (8, 8), draft=False)
    r, g, b = out.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 50 and b < 50


def test_animated_gif_many_frames_first_frame_only():
    frames = [Image.new("RGB", (16, 16), (0, 0, 255))] + [Image.new("RGB", (16, 16), (255, 0, 0))] * 30
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    out = images.decode_image(buf.getvalue(), (8, 8))
    assert out.pixels[..., 2].mean() > 200 and out.pixels[..., 0].mean() < 50


def test_sixteen_bit_rgb_png():
    # 16-bit-per-channel RGB: Pillow reads it as 8-bit RGB; half-intensity stays half.
    h, w = 4, 6
    raw = b"".join(b"\x00" + struct.pack(">" + "H" * 3 * w, *([32768, 0, 65535] * w)) for _ in range(h))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    out = images.decode_image(png, (4, 6), draft=False)
    assert abs(int(out.pixels[..., 0].mean()) - 128) <= 1 and out.pixels[..., 1].max() == 0
    assert out.pixels[..., 2].min() == 255


# --------------------------------------------------------------------------------------------------------------
# tf.train.Example features of the wrong type: a parse failure naming the feature, never an escape.
# --------------------------------------------------------------------------------------------------------------


def _example(**feats) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    def feature(value):
        kind, vals = value
        if kind == "bytes":
            return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=vals))
        if kind == "int":
            return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=vals))
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=vals))

    fm = {k.replace("__", "/"): feature(v) for k, v in feats.items()}
    return example_pb2.Example(features=feature_pb2.Features(feature=fm)).SerializeToString()


GOOD = ("bytes", [b"IMG"])


@pytest.mark.parametrize("feats, key", [
    ({"image__encoded": ("float", [1.0])}, "image/encoded"),
    ({"image__encoded": GOOD, "image__source_id": ("int", [7])}, "image/source_id"),
    ({"image__encoded": GOOD, "image__filename": ("float", [0.5])}, "image/filename"),
    ({"image__encoded": GOOD, "image__class__label": ("bytes", [b"1"])}, "image/class/label"),
    ({"image__encoded": GOOD, "image__class__text": ("int", [1])}, "image/class/text"),
    ({"image__encoded": GOOD, "image__object__bbox__xmin": ("int", [0])}, "image/object/bbox/xmin"),
    ({"image__encoded": GOOD, "image__object__class__text": ("float", [2.0])}, "image/object/class/text"),
])
def test_wrong_feature_types_name_the_feature(feats, key):
    with pytest.raises(records.ExampleError, match=f"feature '{key}' has type"):
        records.parse_example(_example(**feats))


def test_non_utf8_text_and_ragged_boxes_are_parse_errors():
    with pytest.raises(records.ExampleError, match="not UTF-8"):
        records.parse_example(_example(image__encoded=GOOD, image__class__text=("bytes", [b"\xff\xfe"])))
    ragged = {f"image__object__bbox__{k}": ("float", [0.1] * n) for k, n in zip(("xmin", "ymin", "xmax", "ymax"),
                                                                                  (2, 2, 2, 1))}
    with pytest.raises(records.ExampleError, match="differ in length"):
        records.parse_example(_example(image__encoded=GOOD, **ragged))


def test_shard_that_cannot_be_opened_is_one_read_failure(tmp_path):
    from weakloc.transforms.read import _ReadShardDoFn
    from weakloc.transforms.tags import FAILURES

    gone = tmp_path / "deleted-after-listing.tfrecord"
    (out,) = list(_ReadShardDoFn().process((str(gone), 123)))
    assert out.tag == FAILURES
    row = out.value
    assert (row["source"], row["stage"], row["image_id"]) == (str(gone), "read", None)
    assert "cannot read shard after 0 records" in row["message"]


@pytest.mark.parametrize("raw, shown", [
    ("dir/caf\udce9.png", "dir/caf\\xe9.png"),  # Latin-1 byte 0xE9 as os.listdir hands it over
    ("x\ud800y.png", "x\\ud800y.png"),  # a lone surrogate from elsewhere
    ("ok/caf\u00e9.png", "ok/caf\u00e9.png"),  # valid UTF-8 names are shown unchanged
])
def test_printable_path_always_encodes(raw, shown):
    from weakloc.transforms.read import printable_path

    assert printable_path(raw) == shown
    printable_path(raw).encode("utf-8")
