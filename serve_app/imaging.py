"""Pixels -> encoded image bytes, at the HTTP edge (never in the engine)."""

import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from isal import isal_zlib
from PIL import Image

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_PNG_LEVEL = 1  # ISA-L deflate levels are 0-3
# Strips of a large image are deflated in parallel (ISA-L releases the GIL).
STRIP_BYTES = 512 * 1024
STRIP_THREADS = min(8, os.cpu_count() or 1)
_strips = ThreadPoolExecutor(STRIP_THREADS, thread_name_prefix="png")


def encode_image(pixels: np.ndarray, output_format: str, compression: int | None) -> bytes:
    """Encode an HxWx3 uint8 array.

    Args:
        pixels: the image.
        output_format: "png", "webp" or "jpeg".
        compression: OpenAI's `output_compression`, 0-100. For webp and jpeg it is the
            quality (default 100, as OpenAI); for png it picks the deflate level 0-3.
    """
    if output_format == "png":
        level = DEFAULT_PNG_LEVEL if compression is None else round(compression * 3 / 100)
        return encode_png(pixels, level)
    if output_format in ("webp", "jpeg"):
        buf = io.BytesIO()
        quality = 100 if compression is None else compression
        Image.fromarray(pixels).save(buf, format=output_format.upper(), quality=quality)
        return buf.getvalue()
    raise ValueError(f"output_format {output_format!r}: use one of {', '.join(MEDIA_TYPES)}")


def encode_png(pixels: np.ndarray, level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """An 8-bit RGB PNG: every row filtered with "Up" (a numpy subtraction), deflated by
    ISA-L in parallel strips, checksummed by ISA-L, joined with one copy. PNG encoding
    sits on every request's critical path: on an H200 host, for the VAE's 1024x1024
    output, the single-strip version took 16.7 ms against Pillow's 215.9 ms at zlib
    level 1, for 2.68 MB against 2.56 MB (load_tests/results/*levers-2.json)."""
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {pixels.shape} {pixels.dtype}")
    flat = pixels.reshape(height, width * 3)
    rows = np.empty((height, 1 + width * 3), dtype=np.uint8)
    count = max(1, min(STRIP_THREADS, rows.nbytes // STRIP_BYTES, height))
    bounds = [height * i // count for i in range(count + 1)]

    def strip(index: int) -> bytes:
        """Filter rows [first, last) and deflate them. Every strip but the last ends with
        a full flush (byte-aligned, no reference back into it), pigz-style, so the raw
        deflate streams of the strips concatenate into one valid stream."""
        first, last = bounds[index], bounds[index + 1]
        rows[first:last, 0] = 2  # filter type Up: each byte minus the byte above, mod 256
        if first == 0:
            rows[0, 1:] = flat[0]
            first += 1
        np.subtract(flat[first:last], flat[first - 1 : last - 1], out=rows[first:last, 1:])
        raw = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        body = raw.compress(rows[bounds[index] : last])
        end = isal_zlib.Z_FINISH if index == count - 1 else isal_zlib.Z_FULL_FLUSH
        return body + raw.flush(end)

    pieces = [strip(0)] if count == 1 else list(_strips.map(strip, range(count)))
    # The zlib stream: header (deflate, 32K window, fastest; 0x7801 % 31 == 0), the
    # strips, the Adler-32 of the filtered rows.
    stream = [b"\x78\x01", *pieces, struct.pack(">I", isal_zlib.adler32(rows))]
    crc = isal_zlib.crc32(b"IDAT")
    for part in stream:
        crc = isal_zlib.crc32(part, crc)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            struct.pack(">I", sum(map(len, stream))),
            b"IDAT",
            *stream,
            struct.pack(">I", crc),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
