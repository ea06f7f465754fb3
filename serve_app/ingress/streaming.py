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
    on_end: Callable[[BaseException | None, Result | None], dict | None],
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
        on_end: called once at the end with (error or None, result or None); returns the
            error body to send for an error.
        stop: cancels the work and waits for it (the client left).
    """

    async def body() -> AsyncIterator[ServerSentEvent]:
        event_in_hand, ended = first, False
        try:
            while True:
                if isinstance(event_in_hand, Progress):
                    if event_in_hand.steps_done or event_in_hand.stage != "denoise":
                        yield progress_event(event_in_hand, time.monotonic() - started)
                elif isinstance(event_in_hand, Preview):
                    b64 = await asyncio.to_thread(
                        partial_image, event_in_hand, params, fmt, compression
                    )
                    yield event(
                        "image_generation.partial_image",
                        {
                            "b64_json": b64,
                            "partial_image_index": event_in_hand.index,
                            **image_fields(params, fmt),
                        },
                    )
                event_in_hand = await _next(events, work)
                if event_in_hand is None:
                    break
            result = work.result()
            ended = True
            fields = completed_fields(result)
            on_end(None, result)
            yield event(
                "image_generation.completed",
                {
                    "b64_json": result.images[0].decode(),
                    **image_fields(params, fmt),
                    "usage": USAGE,
                    **fields,
                },
            )
        except asyncio.CancelledError:  # the client left
            if not ended:
                await stop()
                on_end(asyncio.CancelledError(), None)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error event
            if not ended:
                ended = True
                error = on_end(exc, None)
                yield ServerSentEvent(json.dumps({"type": "error", **error}), event="error")

    return EventSourceResponse(body(), headers=HEADERS, ping=PING_S)


async def _next(events: asyncio.Queue, work: asyncio.Future):
    """The next event, or None once the work has ended and every event is out."""
    if not events.empty():
        return events.get_nowait()
    getter = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return events.get_nowait() if not events.empty() else None
