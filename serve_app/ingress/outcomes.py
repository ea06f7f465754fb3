"""How each request ends, once: its answer for an error, its metrics and the one
structured log line every request leaves."""

import asyncio
import json
import logging
import time

from fastapi.responses import Response
from ray.serve.exceptions import BackPressureError

from serve_app.errors import Busy, WillNotFit
from serve_app.ingress.catalog import Model
from serve_app.ingress.errors import cause, error_response
from serve_app.ingress.flow import Result, State
from serve_app.messages import GenerationParams
from serve_app.metrics import Metrics

logger = logging.getLogger("ray.serve")


def timings_of(result: Result, started: float) -> dict:
    """The answer's per-stage timings (ms), the image encoding and end to end included."""
    timings = {**result.timings_ms, "encode_image": round(result.encode_image_s * 1000, 3)}
    timings["e2e"] = round((time.monotonic() - started) * 1000, 3)
    return timings


def rejected_for(exc: BaseException) -> str | None:
    """t2i_admission_rejects_total's reason for an exception that turned a request away."""
    if isinstance(exc, WillNotFit):
        return "vram"
    if isinstance(exc, Busy):
        return exc.reason
    if isinstance(exc, BackPressureError):  # Serve's own queue limit
        return "queue"
    return None


class Outcomes:
    """Args:
    metrics: the ingress replica's metrics.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def succeeded(self, request_id, model: Model, params, state, result, timings) -> None:
        """Metrics and the log line of an answered request (after the answer is sent)."""
        e2e = timings["e2e"] / 1000
        self.metrics.stage(model.family, model.id, "encode_image", result.encode_image_s)
        self.metrics.stage(model.family, model.id, "e2e", e2e)
        self.metrics.request(model.family, model.id, "ok")
        log_request(request_id, "ok", model.id, params, state, e2e, timings, result.vram)

    def failed(self, exc, request_id, model: Model | None, params, state, started) -> Response:
        """The answer (None for a client that left), metrics and log line of a request
        that ended otherwise."""
        outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else None
        response = None
        if outcome is None:
            response, outcome = error_response(exc, request_id)
        labels = (model.family, model.id) if model else ("unknown", "unknown")
        reason = rejected_for(cause(exc))
        if reason is not None:
            self.metrics.rejected(*labels, reason)
        self.metrics.request(*labels, outcome)
        log_request(request_id, outcome, labels[1], params, state, time.monotonic() - started)
        return response


def log_request(
    request_id: str,
    outcome: str,
    model_id: str | None,
    params: GenerationParams | None,
    state: State | None,
    e2e_s: float,
    timings: dict | None = None,
    vram: dict | None = None,
) -> None:
    """One structured line per request: enough to trace a slow or heavy one."""
    line = {
        "event": "t2i_request",
        "request_id": request_id,
        "outcome": outcome,
        "model": model_id,
        "e2e_ms": round(e2e_s * 1000, 3),
    }
    if params is not None:
        line.update(
            size=f"{params.width}x{params.height}",
            n=params.num_images,
            steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            seed=params.seed,
            loras=[[c.name, c.scale] for c in params.loras],
        )
    if state is not None and outcome != "ok":
        line["stopped"] = state.report()
    if timings is not None:
        line.update(timings_ms=timings, vram=vram)
    logger.info(json.dumps(line))
