"""What a finished generation answers: the OpenAI JSON body or the image bytes."""

import json
import logging
import time

from fastapi.responses import Response
from starlette.background import BackgroundTask

from serve_app.imaging import MEDIA_TYPES
from serve_app.ingress.flow import Result
from serve_app.messages import GenerationParams

logger = logging.getLogger("ray.serve")


def images_body(images_b64: list[bytes], fields: dict) -> bytes:
    """The JSON answer of /v1/images/generations with the base64 images spliced in as
    bytes, in one copy: base64 needs no JSON escaping, and json.dumps would scan every
    byte of a multi-megabyte answer on the request's critical path."""
    parts = [b'{"data":[']
    for i, image in enumerate(images_b64):
        parts += [b',{"b64_json":"' if i else b'{"b64_json":"', image, b'"}']
    rest = json.dumps(fields).encode()
    parts += [b"]", b"," + rest[1:] if fields else b"}"]
    return b"".join(parts)


def json_answer(
    request_id: str,
    model_id: str,
    output_format: str,
    params: GenerationParams,
    result: Result,
    timings: dict,
    after: BackgroundTask,
) -> Response:
    """POST /v1/images/generations: base64 images, seed, settings, timings, VRAM peaks."""
    fields = {
        "created": int(time.time()),
        "model": model_id,
        "output_format": output_format,
        "size": f"{params.width}x{params.height}",
        "id": request_id,
        "seed": params.seed,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "loras": [{"name": c.name, "scale": c.scale} for c in params.loras],
        "timings": timings,
        "vram": result.vram,
    }
    return Response(
        images_body(result.images, fields), media_type="application/json", background=after
    )


def image_answer(
    output_format: str, params: GenerationParams, result: Result, timings: dict, after
) -> Response:
    """POST /generate: the image's bytes, its seed and stage timings in headers."""
    server_timing = ", ".join(f"{k};dur={v}" for k, v in timings.items())
    headers = {"X-Seed": str(params.seed), "Server-Timing": server_timing}
    return Response(
        result.images[0], media_type=MEDIA_TYPES[output_format], headers=headers, background=after
    )
