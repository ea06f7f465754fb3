"""Pixels -> encoded image bytes, at the HTTP edge (never in the engine)."""

import io

import numpy as np
from PIL import Image

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
# zlib level 1: on 1024x1024 images a few times faster than PIL's default 6, for files
# about 10% larger. A request's `output_compression` (0-100) picks another level.
DEFAULT_PNG_LEVEL = 1


def encode_image(pixels: np.ndarray, output_format: str, compression: int | None) -> bytes:
    """Encode an HxWx3 uint8 array.

    Args:
        pixels: the image.
        output_format: "png", "webp" or "jpeg".
        compression: OpenAI's `output_compression`, 0-100. For webp and jpeg it is the
            quality (default 100, as OpenAI); for png it maps to zlib level 0-9.
    """
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if output_format == "png":
        level = DEFAULT_PNG_LEVEL if compression is None else round(compression * 9 / 100)
        image.save(buf, format="PNG", compress_level=level)
    elif output_format in ("webp", "jpeg"):
        quality = 100 if compression is None else compression
        image.save(buf, format=output_format.upper(), quality=quality)
    else:
        raise ValueError(f"output_format {output_format!r}: use one of {', '.join(MEDIA_TYPES)}")
    return buf.getvalue()
