"""Decode one source image (any JPEG/PNG mode, 8 or 16 bit) to the stored form: 8-bit grayscale,
square, `stored_size_px` wide, JPEG or PNG encoded.

make_shards uses it for every record and inference uses it for every image, so both see the same pixels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from pneumo_dist.errors import PneumoDistError

DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", *DICOM_EXTENSIONS)
IMAGE_FORMATS = ("jpeg", "png")
DEFAULT_JPEG_QUALITY = 95  # shards and inference encode alike (predict.py re-encodes like the shards)
# The only decoders Pillow may use: a TIFF, GIF, WebP or EPS renamed .png is refused, and Pillow never
# hands a file to an external program (its EPS plugin runs Ghostscript).
_PILLOW_FORMATS = ("JPEG", "PNG")
# Kaggle's largest images are about 2,900 x 2,500 px; 50 MP leaves room for other collections while a
# decompression bomb (a tiny file claiming gigapixels) is refused before it is decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# The longest side accepted: 4x the largest flat-panel detectors' ~4,300 px. It bounds the serving
# signature's Lanczos weights (an out x in matrix per pass: 256 x 16,384 float64 = 32 MiB at most), which a
# 1 x 999,999 px PNG, within max_pixels, took to 2.9 GiB.
MAX_SIDE_PX = 16_384
# The decoded image's own size, checked before decoding: 50 MP of 16-bit gray is 100 MB, of RGBA 200 MB.
# Converting it costs at most about as much again (measured: BENCHMARKS.md), and make_shards runs one
# worker per core.
MAX_DECODED_BYTES = 256 * 2**20
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(PneumoDistError):
    """The bytes are not a usable image; the message says why."""


# DICOM: only these attributes are read (the pixels and how to display them). Nothing that identifies a
# patient is read, so nothing of it can reach a record, a manifest or a log.
DICOM_ATTRIBUTES_READ = (
    "Modality",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelData",
)
# Projection radiography: computed (CR), digital (DX) and radiographic imaging (RG). A file without a
# Modality is read; any other modality (CT, MR, SR, PR, ...) is not a chest X-ray and is skipped.
XRAY_MODALITIES = ("CR", "DX", "RG")
_DICOM_MAGIC = (128, b"DICM")  # the preamble's end: how a DICOM file without an extension is known


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_dicom_name(name: str) -> bool:
    return name.lower().endswith(DICOM_EXTENSIONS)


def is_image_file(uri: str) -> bool:
    """What a folder search takes: an image extension, or a DICOM file by its preamble whatever its
    name (PACS exports name files by UID). A file that cannot be read is not one."""
    if has_image_extension(uri):
        return True
    from pneumo_dist import storage

    offset, magic = _DICOM_MAGIC
    try:
        return is_dicom(storage.read_prefix(uri, offset + len(magic)))
    except storage.StorageError:
        return False


def decode_grayscale(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_px: int | None = None):
    """Bytes -> (8-bit grayscale PIL image, (original_height, original_width)).

    `draft_px` lets the JPEG decoder scale down by a power of two while decoding, as long as both sides
    stay at least that large: several times faster on megapixel X-rays and invisible after resizing.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    if is_dicom(data):
        image, size, _ = decode_dicom(data, max_pixels)
        return image, size
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
    if max(width, height) > MAX_SIDE_PX:
        raise BadImage(f"{width}x{height} px: a side longer than {MAX_SIDE_PX:,} px is not an X-ray")
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


def read_file(uri: str) -> bytes:
    """A file's bytes (local or gs://); raises BadImage when it cannot be read."""
    from pneumo_dist import storage

    try:
        return storage.read_bytes(uri)
    except storage.StorageNotFound:
        raise BadImage("no such file") from None
    except storage.StorageError as error:  # a folder, no permission, a bucket that refuses, ...
        raise BadImage(f"cannot be read: {error}") from None


def is_dicom(data: bytes) -> bool:
    offset, magic = _DICOM_MAGIC
    return data[offset : offset + len(magic)] == magic


def decode_dicom(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, header_names: tuple[str, ...] = ()
) -> tuple[Image.Image, tuple[int, int], dict[str, str]]:
    """A DICOM file -> (8-bit gray image, (rows, columns), {name: stripped text} of `header_names`, ""
    for what it lacks): the header attributes come from the same parse as the pixels (make_shards reads
    the patient's sex and age so). Any other error than _read_dicom's own reasons is a BadImage too: a
    hostile file's attribute of any VR and value reaches pydicom and numpy, which raise many kinds of
    errors (tests/dicom_fuzz.py makes them)."""
    try:
        return _read_dicom(data, max_pixels, header_names)
    except BadImage:
        raise
    except Exception as error:  # noqa: BLE001 - see above
        raise BadImage(f"not a usable DICOM file: {_reason(error)}") from None


def _read_dicom(
    data: bytes, max_pixels: int, header_names: tuple[str, ...]
) -> tuple[Image.Image, tuple[int, int], dict[str, str]]:
    """A DICOM file -> (8-bit gray image as a radiologist's viewer shows it, (rows, columns)): the
    Modality LUT (rescale slope/intercept, or its table), then the VOI LUT table or the first window
    (DICOM PS3.3 C.11.2.1.2, linear or sigmoid), else the image's own min..max; MONOCHROME1 inverted."""
    import pydicom

    try:
        tags = [*DICOM_ATTRIBUTES_READ, *header_names]
        dataset = pydicom.dcmread(io.BytesIO(data), specific_tags=tags)
        header = {name: str(dataset.get(name, "") or "").strip() for name in header_names}
        modality = str(dataset.get("Modality", "") or "")
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    except Exception as error:  # noqa: BLE001 - a hostile file can make pydicom raise anything
        # (RecursionError for sequences nested thousands deep, struct.error, KeyError, ...)
        raise BadImage(f"not a readable DICOM file: {_reason(error)}") from None
    if modality and modality not in XRAY_MODALITIES:
        raise BadImage(f"DICOM modality {modality} is not a radiograph ({', '.join(XRAY_MODALITIES)})")
    if "PixelData" not in dataset:
        raise BadImage("DICOM file without pixel data (a report, a presentation state or a damaged file)")
    if frames > 1:
        raise BadImage(f"multi-frame DICOM ({frames} frames): not a single radiograph")
    if rows < 1 or columns < 1:
        raise BadImage(f"DICOM image has no pixels ({columns}x{rows})")
    if rows * columns > max_pixels:
        raise BadImage(
            f"decompression bomb refused: {columns}x{rows} px is more than max_pixels={max_pixels:,}"
        )
    if max(rows, columns) > MAX_SIDE_PX:
        raise BadImage(f"{columns}x{rows} px: a side longer than {MAX_SIDE_PX:,} px is not an X-ray")
    _check_decoded_size(dataset, rows, columns)
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for data it cannot decode
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise BadImage(f"DICOM pixel data cannot be decoded ({name}): {_reason(error)}") from None
    if pixels.shape[:2] != (rows, columns):
        raise BadImage(
            f"DICOM pixel data is {pixels.shape[1]}x{pixels.shape[0]}, its header says {columns}x{rows}"
        )
    try:
        return _display_image(pixels, dataset), (rows, columns), header
    except Exception as error:  # noqa: BLE001 - display attributes of any value and VR reach numpy
        raise BadImage(
            f"DICOM display attributes unusable (window, LUT, rescale): {_reason(error)}"
        ) from None


def _reason(error: BaseException) -> str:
    """An exception as one short line (a hostile file's own text can be long)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# The largest sample pydicom decodes to, in bits; a header's BitsAllocated above it is refused.
_MAX_BITS_ALLOCATED = 32


def _check_decoded_size(dataset, rows: int, columns: int) -> None:
    """Refuse, before any decoding, what would decode to more than MAX_DECODED_BYTES: the header's
    samples x bits, and for compressed pixel data the size the compressed frame itself declares (a JPEG
    frame's SOF, a JPEG 2000 codestream's SIZ), which is what a decoder allocates whatever the header's
    Rows and Columns say."""
    try:
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        bits = int(dataset.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as error:
        raise BadImage(f"DICOM SamplesPerPixel/BitsAllocated unusable: {_reason(error)}") from None
    if samples not in (1, 3) or not 1 <= bits <= _MAX_BITS_ALLOCATED:
        raise BadImage(f"DICOM with {samples} samples of {bits} bits per pixel: not a radiograph")
    decoded = rows * columns * samples * max(1, (bits + 7) // 8)
    if decoded > MAX_DECODED_BYTES:
        raise BadImage(
            f"decompression bomb refused: {columns}x{rows} px of {samples} x {bits} bits would take "
            f"{decoded / 2**20:.0f} MiB decoded, more than the {MAX_DECODED_BYTES / 2**20:.0f} MiB allowed"
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    try:
        encapsulated = syntax is not None and syntax.is_encapsulated
    except (ValueError, AttributeError):  # pydicom: "UID is not a transfer syntax"
        raise BadImage(f"DICOM transfer syntax unknown: {str(syntax)[:64]}") from None
    if not encapsulated or syntax == "1.2.840.10008.1.2.5":
        return  # native pixels (their size is the header's) or RLE (pydicom decodes to the header's size)
    frame = _encapsulated_frame_size(dataset.PixelData)
    if frame is None:
        raise BadImage("DICOM compressed pixel data without a readable frame header (size unknown)")
    frame_rows, frame_columns, _ = frame
    # Equal to the header's, the frame is within the header's checks above.
    if (frame_rows, frame_columns) != (rows, columns):
        raise BadImage(
            f"DICOM header says {columns}x{rows} px but its compressed frame is {frame_columns}x{frame_rows}"
        )


# JPEG start-of-frame markers (ITU T.81 B.1.1.3; JPEG-LS T.87's SOF55 = 0xF7): the frame's size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _encapsulated_frame_size(pixel_data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) that the first compressed frame declares: a JPEG / JPEG-LS frame's
    SOF segment or a JPEG 2000 codestream's SIZ segment (ISO 15444-1 A.5.1); None if neither is found."""
    from pydicom.encaps import generate_fragments

    try:
        fragments = generate_fragments(pixel_data)
        next(fragments)  # the Basic Offset Table
        head = b"".join(fragment for _, fragment in zip(range(4), fragments, strict=False))[: 1 << 16]
    except Exception:  # noqa: BLE001 - malformed item tags
        return None
    if head.startswith(b"\xff\xd8"):
        position = 2
        while position + 4 <= len(head) and head[position] == 0xFF:
            marker = head[position + 1]
            length = int.from_bytes(head[position + 2 : position + 4], "big")
            if marker in _JPEG_SOF and position + 10 <= len(head):
                rows = int.from_bytes(head[position + 5 : position + 7], "big")
                columns = int.from_bytes(head[position + 7 : position + 9], "big")
                return rows, columns, head[position + 9]
            position += 2 + length
        return None
    siz = head.find(b"\xff\x51")
    if head.startswith(b"\xff\x4f\xff\x51") or (siz >= 0 and head[:12].find(b"jP") >= 0):
        if siz < 0 or siz + 40 > len(head):
            return None

        def number(offset: int) -> int:
            return int.from_bytes(head[siz + offset : siz + offset + 4], "big")

        columns, rows = number(6) - number(14), number(10) - number(18)
        components = int.from_bytes(head[siz + 38 : siz + 40], "big")
        return rows, columns, components
    return None


def _display_image(pixels: np.ndarray, dataset) -> Image.Image:
    """Decoded DICOM pixels -> the 8-bit gray image a viewer shows."""
    if pixels.ndim == 3:  # RGB (pydicom converts YBR): as any colour image
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    windowed = "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)
    # Integer pixels of up to 16 bits: the display of each stored value from lowest to highest, then a
    # look-up per pixel, instead of float64 arithmetic on millions of pixels (2.4x faster at 2048 x 2048,
    # BENCHMARKS.md).
    # Not for a min..max stretch after a Modality LUT table, whose extremes need not be at the lowest
    # and highest stored values.
    if (
        pixels.dtype.kind in "iu"
        and pixels.dtype.itemsize <= 2
        and (windowed or "ModalityLUTSequence" not in dataset)
    ):
        low, high = int(pixels.min()), int(pixels.max())
        table = _display(np.arange(low, high + 1, dtype=pixels.dtype)[np.newaxis], dataset)[0]
        unsigned = pixels.view(f"u{pixels.dtype.itemsize}")
        offsets = unsigned - unsigned.dtype.type(low % 2 ** (8 * pixels.dtype.itemsize))  # wraps right
        gray = np.take(table, offsets)
    else:
        gray = _display(pixels, dataset)
    return Image.fromarray(gray, mode="L")


def _display(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored pixel values -> the 8-bit gray a viewer shows them as."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset:
        lut = dataset.VOILUTSequence[0]
        values = apply_voi(values, dataset, index=0).astype(np.float64)
        bits = int(lut.LUTDescriptor[2])
        gray = np.round(np.clip(values / (2**bits - 1), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        gray = _window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth), dataset)
    else:
        gray = _stretch_to_uint8(values)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: the lowest value is white
    return gray


def _first(value) -> float:
    """A DICOM number that may be multi-valued (several windows): the first."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _window(values: np.ndarray, center: float, width: float, dataset) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2: the VOI window onto 0..255 (LINEAR, LINEAR_EXACT or SIGMOID)."""
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        scaled = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    elif function == "LINEAR_EXACT":
        scaled = (values - center) / max(width, 1e-6) + 0.5
    else:
        scaled = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


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
