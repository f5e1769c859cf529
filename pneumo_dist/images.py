"""Decode one source image (any JPEG/PNG mode, 8 or 16 bit) to the stored form: 8-bit grayscale,
square, `stored_size_px` wide, JPEG or PNG encoded.

make_shards uses it for every record and inference uses it for every image, so both see the same pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from pneumo_dist.errors import PneumoDistError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGE_FORMATS = ("jpeg", "png")
DEFAULT_JPEG_QUALITY = 95  # shards and inference encode alike (predict.py re-encodes like the shards)
# The only decoders Pillow may use: a TIFF, GIF, WebP or EPS renamed .png is refused, and Pillow never
# hands a file to an external program (its EPS plugin runs Ghostscript).
_PILLOW_FORMATS = ("JPEG", "PNG")
# Kaggle's largest images are about 2,900 x 2,500 px; 50 MP leaves room for other collections while a
# decompression bomb (a tiny file claiming gigapixels) is refused before it is decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# The decoded image's own size, checked before decoding: 50 MP of 16-bit gray is 100 MB, of RGBA 200 MB.
# Converting it costs at most about as much again (measured: BENCHMARKS.md), and make_shards runs one
# worker per core.
MAX_DECODED_BYTES = 256 * 2**20
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(PneumoDistError):
    """The bytes are not a usable image; the message says why."""


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_grayscale(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_px: int | None = None):
    """Bytes -> (8-bit grayscale PIL image, (original_height, original_width)).

    `draft_px` lets the JPEG decoder scale down by a power of two while decoding, as long as both sides
    stay at least that large: several times faster on megapixel X-rays and invisible after resizing.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        raise BadImage("not a readable image (not a JPEG or PNG, or a corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"decompression bomb refused: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"truncated or corrupt image header: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"decompression bomb refused: {width}x{height} px is more than max_pixels={max_pixels:,}"
        )
    decoded_bytes = width * height * _bytes_per_pixel(image.mode)
    if decoded_bytes > MAX_DECODED_BYTES:
        raise BadImage(
            f"{width}x{height} px in mode {image.mode} would take {decoded_bytes / 2**20:.0f} MiB decoded, "
            f"more than the {MAX_DECODED_BYTES / 2**20:.0f} MiB allowed per image"
        )
    if draft_px and image.format == "JPEG":
        image.draft("L", (draft_px, draft_px))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"truncated or corrupt image data: {error}") from None
    image = ImageOps.exif_transpose(image)
    if (image.width > image.height) != (width > height):
        width, height = height, width  # EXIF said the sensor was rotated
    return _to_grayscale(image), (height, width)


def _bytes_per_pixel(mode: str) -> int:
    try:
        descriptor = ImageMode.getmode(mode)
    except KeyError:
        return 4
    return len(descriptor.bands) * int(descriptor.typestr[-1])


def _to_grayscale(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit X-rays often use only 10-12 of their bits, so a fixed /257 would leave them nearly
        # black: stretch each image's own range to 0..255 instead.
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)), mode="L")
    # RGB, RGBA/LA (alpha dropped), CMYK, palette, 1-bit: through RGB, with ITU-R 601 luma weights.
    return image.convert("RGB").convert("L")


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map the array's min..max linearly onto 0..255 (rounded), a band of rows at a time, so memory
    stays near the image plus its 8-bit result (float64 arithmetic on the whole image took 1.2 GB for
    a 7000 x 7000 px 16-bit PNG)."""
    low, high = float(pixels.min()), float(pixels.max())
    out = np.zeros(pixels.shape, np.uint8)
    if high <= low:
        return out
    scale = np.float32(255.0 / (high - low))
    rows = max(1, (1 << 20) // max(1, pixels.shape[1]))
    for start in range(0, pixels.shape[0], rows):
        band = pixels[start : start + rows].astype(np.float32)
        band -= np.float32(low)
        band *= scale
        out[start : start + rows] = np.round(band, out=band)
    return out


def resize_square(image: Image.Image, size_px: int) -> Image.Image:
    """Squash to size_px x size_px. The aspect ratio is not kept: this is what the pneumonia literature
    does, it keeps the whole thorax, and the original size is stored with each record."""
    if image.size == (size_px, size_px):
        return image
    return image.resize((size_px, size_px), Image.Resampling.LANCZOS)


def encode(image: Image.Image, image_format: str, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    if image_format == "jpeg":
        image.save(out, format="JPEG", quality=jpeg_quality)
    elif image_format == "png":
        image.save(out, format="PNG")
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return out.getvalue()


def to_stored_image(
    data: bytes,
    stored_size_px: int,
    image_format: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, tuple[int, int]]:
    """Source bytes -> (encoded stored image, (original_height, original_width)). Raises BadImage."""
    gray, original_size = decode_grayscale(data, max_pixels=max_pixels, draft_px=stored_size_px)
    return encode(resize_square(gray, stored_size_px), image_format, jpeg_quality), original_size


def pil_to_stored_image(
    image: Image.Image,
    stored_size_px: int,
    image_format: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """An already decoded PIL image (any mode) -> encoded stored image. Raises BadImage."""
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} px is more than max_pixels={max_pixels:,}")
    gray = _to_grayscale(ImageOps.exif_transpose(image))
    return encode(resize_square(gray, stored_size_px), image_format, jpeg_quality)


def array_to_stored_image(
    pixels: np.ndarray,
    stored_size_px: int,
    image_format: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array (MedMNIST) -> encoded stored image."""
    channels_ok = pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4))
    if pixels.dtype != np.uint8 or not channels_ok or 0 in pixels.shape:
        raise BadImage(
            f"expected a uint8 (H, W), (H, W, 1) or (H, W, 3) array of 0..255 pixels, "
            f"got {pixels.dtype} {pixels.shape}"
        )
    if pixels.ndim == 3:
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels[..., :3])
    image = Image.fromarray(pixels)
    return encode(resize_square(_to_grayscale(image), stored_size_px), image_format, jpeg_quality)
