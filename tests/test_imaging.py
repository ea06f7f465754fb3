import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app import imaging
from serve_app.imaging import encode_image, encode_png


def decode(data: bytes) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.format, np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("shape", [(256, 256, 3), (1, 7, 3), (384, 320, 3)])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_png_round_trips_through_pillow_exactly(shape, level):
    rng = np.random.default_rng(sum(shape) + level)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    fmt, back = decode(encode_png(pixels, level))
    assert fmt == "PNG"
    np.testing.assert_array_equal(back, pixels)


def test_png_of_a_smooth_image_is_compressed():
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)
    pixels = np.broadcast_to(ramp[None, :, None], (512, 512, 3)).copy()
    assert len(encode_image(pixels, "png", None)) < pixels.nbytes / 20


def test_output_compression_picks_the_png_level():
    rng = np.random.default_rng(0)
    pixels = (rng.random((256, 256, 3)) * 64).astype(np.uint8)  # compressible noise
    stored, best = encode_image(pixels, "png", 0), encode_image(pixels, "png", 100)
    assert len(best) < len(stored)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_lossy_formats(fmt):
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    got, back = decode(encode_image(pixels, fmt, 90))
    assert got == fmt.upper() and back.shape == (64, 64, 3)


def test_png_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


@pytest.fixture
def strips(monkeypatch):
    """Several strips whatever this machine's core count (one core would mean one)."""
    monkeypatch.setattr(imaging, "STRIP_THREADS", 4)


def test_large_png_is_deflated_in_strips_that_decode_as_one_stream(strips):
    rng = np.random.default_rng(7)
    pixels = (rng.random((1024, 1024, 3)) * 40).astype(np.uint8)  # several strips
    _, back = decode(encode_png(pixels, 1))
    np.testing.assert_array_equal(back, pixels)


def test_png_chunk_crcs_and_the_zlib_adler32_are_right(strips):
    """Pillow does not check every checksum; zlib and crc32 do."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)  # several strips
    png, pos, idat = encode_png(pixels), 8, b""
    while pos < len(png):
        (size,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + size]
        assert struct.unpack(">I", png[pos + 8 + size : pos + 12 + size])[0] == zlib.crc32(
            kind + data
        ), kind
        idat += data if kind == b"IDAT" else b""
        pos += 12 + size
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8)  # checks the Adler-32
    assert rows.size == 700 * (1 + 900 * 3)
