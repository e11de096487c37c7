"""Image bytes as a request or a pyfunc call sends them: decoded from base64, opened by the pipeline's own decoders
only, and refused from the header when the work they ask for is too much. No torch: the ONNX runtime of a
compressed variant and the server's request checks use it without loading torch."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from tlops.data.discovery import DECODE_FORMATS, DEFAULT_MAX_PIXELS

SEND = "send the bytes of an image file (PNG, JPEG, BMP, GIF, TIFF or WebP), base64-encoded"
# Base64 text that arrives as bytes: MLflow's ``instances``/``inputs`` parsing hands the column over undecoded.
# An image file never matches: every format's signature has a byte outside this alphabet (or a NUL).
_BASE64_BYTES = re.compile(rb"[A-Za-z0-9+/\r\n]+={0,2}\s*")


class ImageInputError(ValueError):
    """One instance of a request is not a usable image; the message names the instance and what to send."""

    def __init__(self, index: int, problem: str, hint: str = SEND) -> None:
        super().__init__(f"instance {index}: {problem}; {hint}")
        self.index = index


def image_bytes(value: Any, index: int = 0) -> bytes:
    """An ``image`` cell to file bytes: raw bytes, or base64 as text or as bytes."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value)
        if _BASE64_BYTES.fullmatch(value):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                pass  # not base64 after all: the file's own bytes
        return value
    if not isinstance(value, str):
        raise ImageInputError(index, f"'image' must be base64 text, not {type(value).__name__}")
    if not value.strip():
        raise ImageInputError(index, "'image' is empty")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(index, f"'image' is not valid base64 ({exc})") from None


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()  # every plugin registered, so each name is known
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def _refused(index: int, exc: Exception) -> ImageInputError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ImageInputError(index, f"not a readable image ({type(exc).__name__}{': ' if first else ''}{first:.200})")


def _open(data: bytes, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image, opened (its header read, nothing decoded), by the decoders of the formats the pipeline reads
    (``tlops.data.discovery.DECODE_FORMATS``) and no other: an AVIF, DDS or EPS file is not an image here, as it
    is not in the data. Whatever a decoder still raises on bytes it refuses is the image's fault, never the server's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies after
            return Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        raise ImageInputError(index, f"not an image: {len(data)} bytes in none of the formats the server "
                                     "decodes") from None
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit: refused by PIL at open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageInputError(index, f"{found.group(1) if found else 'more'} pixels exceeds the limit of "
                                     f"{max_pixels}; not decoded", "send a smaller image") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise _refused(index, exc) from None


def check_header(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Refuse what is no image, or too many pixels, from the header alone: a decompression bomb is never decoded.
    Returns the image's width and height."""
    with _open(data, index, max_pixels) as img:
        width, height = img.size
    if width < 1 or height < 1:
        raise ImageInputError(index, f"the header declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageInputError(index, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}; "
                                     "not decoded", "send a smaller image")
    return width, height


def load_image(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image decoded, by the pipeline's decoders only, after its header passed the pixel limit."""
    img = _open(data, index, max_pixels)
    if img.width * img.height > max_pixels:
        raise ImageInputError(index, f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}; "
                                     "not decoded", "send a smaller image")
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _refused(index, exc) from None
    return img


def to_mode(img: Image.Image, color_mode: str, exif_transpose: bool) -> Image.Image:
    """A decoded image as a preprocessing spec reads it: turned upright by its EXIF orientation (when the spec
    says so), then converted to the spec's colour mode, palette and alpha images through RGBA so that
    transparency turns black, as PIL does. One function for training, evaluation and every serving runtime."""
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode != color_mode:
        if img.mode in ("P", "LA", "PA"):
            img = img.convert("RGBA")
        img = img.convert(color_mode)
    return img


def resized_size(spec: Any, width: int, height: int) -> tuple[int, int]:
    """Width and height after the spec's resize, before its crop, as torchvision computes them."""
    if spec.resize_rule != "shorter-side-then-crop":
        return spec.crop_size, spec.crop_size
    short, long = sorted((width, height))
    new_long = int(spec.resize_size * long / short)
    return (spec.resize_size, new_long) if width <= height else (new_long, spec.resize_size)


def check_work(data: bytes, index: int, spec: Any, max_aspect_ratio: float,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """:func:`check_header`, and the work of the preprocessing bounded by the size of its output, before anything
    is decoded. Its resize makes the shorter side ``spec.resize_size``, so a thin strip grows with its aspect ratio
    (1 x 1,000,000 px to 36 x 36,000,000 for a 32 px input): over ``max_aspect_ratio`` (the data's own limit,
    ``tlops.data.discovery.max_aspect_ratio``) it is refused, which bounds the resize to about
    ``max_aspect_ratio`` times ``resize_size`` squared pixels. Returns the pixels to decode."""
    width, height = check_header(data, index, max_pixels)
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        out_w, out_h = resized_size(spec, width, height)
        raise ImageInputError(
            index, f"{width}x{height} pixels, an aspect ratio of {ratio:.0f}:1, over the limit of "
                   f"{max_aspect_ratio:g}:1 (TLOPS_MAX_ASPECT_RATIO, as for the data): its resize for the "
                   f"{spec.crop_size}x{spec.crop_size} input would make {out_w}x{out_h} = {out_w * out_h} pixels; "
                   "not decoded",
            f"crop or pad the image to an aspect ratio of at most {max_aspect_ratio:g}:1")
    return width * height
