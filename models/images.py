"""Image bytes to the model's input: decode any common format, apply EXIF orientation, resize.

Everything here is plain Pillow and numpy. A failure raises `ImageDecodeError` with a reason a person can act
on; the Beam layer turns it into a failure row, so no exception from here may escape as anything else.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import defaults



class ImageDecodeError(ValueError):
    """Raised when bytes cannot become an RGB image; `reason` is a short machine-friendly tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A decoded image ready for the model.

    pixels: numpy.ndarray(dtype=uint8, shape=(H_in, W_in, 3)), RGB at the model input size.
    width, height: the original size in pixels as a viewer shows it (after EXIF orientation).
    format: the container format Pillow recognised ("JPEG", "PNG", ...).
    orientation: the EXIF orientation tag that was applied (1-8; 1 means none).
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str
    orientation: int = 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, compositing transparency over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (Pillow also opens some 16-bit files as 32-bit "I"): map 0..65535 to 0..255 by the
        # bit depth, never by the content, so a dark image stays dark.
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(arr * (255.0 / 65535.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def file_orientation(stream) -> int:
    """The EXIF orientation tag (1-8; 1 when absent) of an open image file, read as decode_image reads it, without
    keeping its pixels. Raises what Pillow raises for a file it cannot open."""
    with Image.open(stream) as img:
        if img.format != "JPEG":
            img.load()  # PNG and others may keep EXIF after the pixels
        return _orientation(img)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8), 1 when absent or unreadable: a broken EXIF block must not cost the picture."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def decode_image(
    data: bytes,
    input_size: tuple[int, int],
    *,
    max_pixels: int = defaults.MAX_PIXELS,
    draft: bool = True,
) -> DecodedImage:
    """Decode image bytes and resize (bilinear) to the model input size.

    Args:
      data: the encoded file (JPEG, PNG, BMP, GIF (first frame), WebP, TIFF, ...).
      input_size: (H, W) of the model input.
      max_pixels: images with more pixels than this are refused before they are decoded.
      draft: let Pillow decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when the target is much smaller;
        the result is then resized as usual. It changes pixel values slightly, never the reported size.

    Returns:
      DecodedImage whose width/height are those a viewer shows (EXIF orientation applied).

    Raises:
      ImageDecodeError: empty, unrecognised, too large, truncated or otherwise undecodable bytes.
    """
    if not data:
        raise ImageDecodeError("empty", "image bytes are empty (0 bytes)")
    h_in, w_in = int(input_size[0]), int(input_size[1])
    img = _open_checked(data, max_pixels)
    fmt = img.format or "unknown"
    w_raw, h_raw = img.size
    try:
        rgb, orientation = _load_oriented(img, fmt, (h_in, w_in), draft)
        if fmt == "JPEG":
            # Draft mode may have decoded at 1/2..1/8 scale: the true size is the header's, rotated as shown.
            width, height = (h_raw, w_raw) if orientation in (5, 6, 7, 8) else (w_raw, h_raw)
        else:
            # Some decoders (TIFF) already rotate at open; the transposed picture's own size is the truth.
            width, height = rgb.size
        if rgb.size != (w_in, h_in):
            rgb = rgb.resize((w_in, h_in), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated files surface as OSError("image file is truncated ...") or "broken data stream".
        raise ImageDecodeError("corrupt", f"cannot decode {fmt} image: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"cannot decode {fmt} image: {type(exc).__name__}: {exc}") from exc
    if pixels.shape != (h_in, w_in, 3):
        raise ImageDecodeError("corrupt", f"decoded to unexpected shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=int(width), height=int(height), format=fmt, orientation=int(orientation))


def _open_checked(data: bytes, max_pixels: int):
    """Pillow's lazy open of the header, refused (before any pixel is decoded) above `max_pixels`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) between 1x and 2x its own limit; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("unrecognised", f"not a recognised image format ({len(data)} bytes)") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fired while reading the header.
        raise ImageDecodeError("too_large", f"{exc} (--max_pixels is {max_pixels})") from exc
    except Exception as exc:  # Pillow raises a zoo of types on hostile headers
        raise ImageDecodeError("unreadable", f"cannot open image: {type(exc).__name__}: {exc}") from exc
    w_raw, h_raw = img.size
    if w_raw <= 0 or h_raw <= 0:
        raise ImageDecodeError("empty", f"image has no pixels ({w_raw}x{h_raw})")
    if w_raw * h_raw > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"image is {w_raw}x{h_raw} = {w_raw * h_raw} pixels, above the limit of {max_pixels} "
            "(set --max_pixels to raise it)",
        )
    return img


def _load_oriented(img, fmt: str, size: tuple[int, int], draft: bool):
    """(RGB picture as a viewer sees it, its EXIF orientation); JPEGs at the smallest DCT scale >= `size` (H, W)
    when `draft`. Decoding errors propagate to `decode_image`, which names them."""
    h_in, w_in = size
    if getattr(img, "is_animated", False):
        img.seek(0)
    if fmt == "JPEG":
        # JPEG keeps EXIF in a header segment: read it before choosing the draft scale.
        orientation = _orientation(img)
        if draft:
            # Ask the JPEG decoder for the smallest DCT scale still >= the target in both axes.
            transposed = orientation in (5, 6, 7, 8)
            img.draft("RGB", (h_in, w_in) if transposed else (w_in, h_in))
        img.load()
    else:
        # Other formats (PNG) may keep EXIF after the pixels, and Pillow loads the pixels to find it; load here
        # so a corrupt body raises instead of being swallowed with the EXIF error (it would decode black).
        img.load()
        orientation = _orientation(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img), orientation
