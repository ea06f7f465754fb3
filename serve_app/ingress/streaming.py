"""`"stream": true`: server-sent events in the OpenAI image-streaming shape.

One `image_generation.progress` event per denoising step (and one as decoding starts),
`image_generation.partial_image` events for the previews asked for (`partial_images`),
then `image_generation.completed` with the image and our fields (seed, timings, vram).
A failure after the stream has started is an `error` event with the error body the
JSON answer would have had. Framing by sse-starlette.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pybase64
from PIL import Image
from sse_starlette import EventSourceResponse, ServerSentEvent

from serve_app.imaging import encode_image
from serve_app.ingress.flow import Result
from serve_app.messages import GenerationParams, Preview, Progress
from serve_app.relay import relay

# Sent unbuffered through reverse proxies (nginx reads X-Accel-Buffering).
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Comment lines keep idle proxies from closing the connection during a long queue.
PING_S = 10


def event(kind: str, data: dict) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"type": kind, **data}), event=kind)


def progress_event(p: Progress, elapsed_s: float) -> ServerSentEvent:
    return event(
        "image_generation.progress",
        {
            "stage": p.stage,
            "step": p.steps_done,
            "total": p.steps_total,
            "elapsed_ms": round(elapsed_s * 1000, 1),
        },
    )


def partial_image(preview: Preview, params: GenerationParams, fmt: str, compression) -> str:
    """The preview at the image's size, encoded as the image will be, in base64."""
    small = Image.fromarray(preview.pixels)
    full = small.resize((params.width, params.height), Image.Resampling.BILINEAR)
    encoded = encode_image(np.asarray(full), fmt, compression)
    return pybase64.b64encode(encoded).decode()


def image_fields(params: GenerationParams, fmt: str) -> dict:
    return {
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": fmt,
        "quality": "auto",
        "size": f"{params.width}x{params.height}",
    }


USAGE = {  # OpenAI's token accounting, which this service does not do
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def stream_answer(
    first,
    events: asyncio.Queue,
    work: asyncio.Future,
    params: GenerationParams,
    fmt: str,
    compression: int | None,
    started: float,
    completed_fields: Callable[[Result], dict],
    on_end: Callable[[BaseException | None, Result | None, dict | None], dict | None],
    stop: Callable[[], "asyncio.Future"],
) -> EventSourceResponse:
    """The SSE answer of a running generation.

    Args:
        first: its first event (the stream starts only once the request runs, so that
            refusals before it are the plain JSON errors).
        events: where the flow puts its Progress and Preview events.
        work: the flow's task; its result is the finished generation.
        params, fmt, compression: what was asked.
        started: time.monotonic() at the request's start.
        completed_fields: our fields of the completed event, from the result.
        on_end: called once at the end with (error or None, result or None, the
            completed event's timings or None); returns the error body for an error.
        stop: cancels the work and waits for it (the client left).
    """

    async def sse(item) -> ServerSentEvent | None:
        if isinstance(item, Progress):
            if item.steps_done or item.stage != "denoise":  # not the job's start
                return progress_event(item, time.monotonic() - started)
        elif isinstance(item, Preview):
            b64 = await asyncio.to_thread(partial_image, item, params, fmt, compression)
            fields = {"b64_json": b64, "partial_image_index": item.index}
            return event("image_generation.partial_image", {**fields, **image_fields(params, fmt)})
        return None

    async def body() -> AsyncIterator[ServerSentEvent]:
        ended = False
        try:
            if (out := await sse(first)) is not None:
                yield out
            async for item in relay(events, work):
                if (out := await sse(item)) is not None:
                    yield out
            result = work.result()
            ended = True
            fields = completed_fields(result)
            on_end(None, result, fields["timings"])
            image = {"b64_json": result.images[0].decode(), **image_fields(params, fmt)}
            yield event("image_generation.completed", {**image, "usage": USAGE, **fields})
        except asyncio.CancelledError:  # the client left
            if not ended:
                await stop()
                on_end(asyncio.CancelledError(), None, None)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error event
            if not ended:
                ended = True
                error = on_end(exc, None, None)
                yield ServerSentEvent(json.dumps({"type": "error", **error}), event="error")

    return EventSourceResponse(body(), headers=HEADERS, ping=PING_S)
