import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumo_dist import images


def encoded(image: Image.Image, format_: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format_, **kwargs)
    return out.getvalue()


def gradient(width=80, height=60) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


@pytest.mark.parametrize(
    "mode, format_",
    [
        ("L", "JPEG"),
        ("RGB", "JPEG"),
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
    ],
)
def test_any_mode_becomes_8bit_grayscale_of_the_stored_size(mode, format_):
    data = encoded(Image.fromarray(gradient()).convert(mode), format_)
    stored, original_size = images.to_stored_image(data, 32)
    result = Image.open(io.BytesIO(stored))
    assert (result.mode, result.size, result.format) == ("L", (32, 32), "JPEG")
    assert original_size == (60, 80)
    pixels = np.asarray(result, dtype=float)
    if mode != "1":  # a gradient survives every conversion: dark on the left, bright on the right
        assert pixels[:, :4].mean() < 60 < 190 < pixels[:, -4:].mean()


def test_sixteen_bit_png_is_stretched_over_its_own_range():
    twelve_bit = (np.tile(np.linspace(0, 4095, 64), (48, 1))).astype(np.uint16)
    data = encoded(Image.fromarray(twelve_bit), "PNG")
    gray, _ = images.decode_grayscale(data)
    pixels = np.asarray(gray)
    assert gray.mode == "L" and pixels.min() == 0 and pixels.max() == 255


def test_png_format_is_lossless():
    pixels = gradient(32, 32)
    stored, _ = images.to_stored_image(encoded(Image.fromarray(pixels), "PNG"), 32, image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), pixels)


def test_exif_rotation_is_applied_and_original_size_follows_it():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = encoded(Image.fromarray(gradient(80, 60)), "JPEG", exif=exif)
    gray, original_size = images.decode_grayscale(data)
    assert gray.size == (60, 80)  # PIL sizes are (width, height)
    assert original_size == (80, 60)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a readable image"),
        (encoded(Image.fromarray(gradient()), "JPEG")[:300], "truncated or corrupt"),
        (encoded(Image.fromarray(gradient()), "PNG")[:-40], "truncated or corrupt"),
    ],
    ids=["zero-byte", "text", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_raise_bad_image_with_the_reason(data, reason):
    with pytest.raises(images.BadImage, match=reason):
        images.to_stored_image(data, 32)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("L", (8000, 7000)), "PNG")  # 56 MP in about 60 kB
    assert len(bomb) < 200_000
    with pytest.raises(images.BadImage, match="decompression bomb refused: 8000x7000"):
        images.to_stored_image(bomb, 32)
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.to_stored_image(encoded(Image.new("L", (100, 100)), "PNG"), 32, max_pixels=5000)


def test_array_source_becomes_stored_image():
    stored = images.array_to_stored_image(gradient(28, 28), 28, image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), gradient(28, 28))
    with pytest.raises(images.BadImage, match="uint8"):
        images.array_to_stored_image(np.zeros((28, 28), np.float32), 28)


@pytest.mark.parametrize("format_", ["TIFF", "GIF", "WEBP", "BMP", "EPS"])
def test_formats_the_product_does_not_claim_are_refused_whatever_their_name(format_):
    data = encoded(Image.fromarray(gradient()).convert("RGB" if format_ == "EPS" else "L"), format_)
    with pytest.raises(images.BadImage, match="not a readable image .*not a JPEG or PNG"):
        images.to_stored_image(data, 32)


def test_an_eps_renamed_png_never_starts_ghostscript(tmp_path):
    marker = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(0o755)
    eps = tmp_path / "scan.png"
    eps.write_bytes(encoded(Image.fromarray(gradient()).convert("RGB"), "EPS"))
    # A fresh process: Pillow looks for Ghostscript on the PATH once per process.
    code = f"from pneumo_dist import images; images.to_stored_image(open({str(eps)!r}, 'rb').read(), 32)"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "BadImage: not a readable image" in run.stderr, run.stderr[-2000:]
    assert not marker.exists()


def png_header(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG that claims a size and pixel format and holds no pixels: what Pillow reads before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_decoded_memory_per_image_is_capped_before_decoding():
    rgba = png_header(9000, 8000, 8, 6)  # 72 MP of RGBA: 275 MiB decoded
    with pytest.raises(images.BadImage, match="9000x8000 px in mode RGBA would take 275 MiB decoded"):
        images.to_stored_image(rgba, 32, max_pixels=100_000_000)


def test_a_large_sixteen_bit_png_decodes_in_bounded_memory():
    """A 96 kB 16-bit 7000 x 7000 px PNG took 1.2 GB to convert; the image itself is 98 MB."""
    code = """
import io, resource
import numpy as np
from PIL import Image
from pneumo_dist import images
pixels = np.zeros((7000, 7000), np.uint16)
pixels[100:200, 100:3000] = 4000
out = io.BytesIO()
Image.fromarray(pixels).save(out, format="PNG")
data = out.getvalue()
del pixels, out
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stored, size = images.to_stored_image(data, 64, image_format="png")
assert size == (7000, 7000) and Image.open(io.BytesIO(stored)).size == (64, 64)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    growth_mb = int(run.stdout.strip())
    assert growth_mb < 400, f"converting took {growth_mb} MB more"
