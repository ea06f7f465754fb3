"""The HTTP edge: validation, request ids, cancellation, image encoding, the web page.

It never imports torch: the model replicas answer in numpy and plain Python
(serve_app/messages.py). Domain errors become HTTP answers in one place,
`error_response`, in the OpenAI error shape.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

import pybase64
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from serve_app.config import AppConfig
from serve_app.errors import Cancelled, DoesNotFit, PromptTooLong
from serve_app.imaging import MEDIA_TYPES, encode_image
from serve_app.inflight import DuplicateRequestId
from serve_app.messages import Generated, GenerationParams, Progress
from serve_app.metrics import Metrics
from serve_app.schema import (
    MAX_IMAGES,
    MAX_STEPS,
    ImageRequest,
    InvalidRequest,
    Limits,
    parse_request,
    resolve,
)

logger = logging.getLogger("ray.serve")

MAX_REQUEST_ID = 128
DESCRIBE_TIMEOUT_S = 10.0


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


class NotReady(Exception):
    """The model replicas did not answer; the service cannot take requests yet."""


class BodyTooLarge(InvalidRequest):
    def __init__(self, size: int, limit: int):
        super().__init__(f"the body is {size} bytes; the limit is {limit}", None, "body_too_large")


# (status, OpenAI error type, outcome label) per domain exception: the one mapping.
_ERRORS: list[tuple[type[BaseException], int, str, str]] = [
    (BodyTooLarge, 413, "invalid_request_error", "invalid"),
    (InvalidRequest, 400, "invalid_request_error", "invalid"),
    (PromptTooLong, 400, "invalid_request_error", "invalid"),
    (DuplicateRequestId, 409, "invalid_request_error", "invalid"),
    (DoesNotFit, 413, "invalid_request_error", "oom"),
    (BackPressureError, 429, "rate_limit_error", "rejected"),
    (Cancelled, 499, "cancelled", "cancelled"),
    (NotReady, 503, "service_unavailable", "rejected"),
    (DeploymentUnavailableError, 503, "service_unavailable", "rejected"),
]
_CODES = {
    PromptTooLong: "prompt_too_long",
    DuplicateRequestId: "duplicate_request_id",
    DoesNotFit: "does_not_fit",
    BackPressureError: "queue_full",
    Cancelled: "cancelled",
    NotReady: "not_ready",
    DeploymentUnavailableError: "not_ready",
}


def _cause(exc: BaseException) -> BaseException:
    # Ray re-raises a replica's exception as RayTaskError; the original is its `cause`.
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def error_response(exc: BaseException, request_id: str) -> tuple[JSONResponse, str]:
    """The HTTP answer and the outcome label for an exception raised by a request."""
    exc = _cause(exc)
    known = next((e for e in _ERRORS if isinstance(exc, e[0])), None)
    if known is not None:
        kind, status, err_type, outcome = known
        param = getattr(exc, "param", None)
        code = getattr(exc, "code", None) or _CODES.get(kind)
        message = str(exc)
        if isinstance(exc, BackPressureError):
            message = "the service is at capacity; retry shortly"
    else:
        status, err_type, outcome, param, code = 500, "server_error", "error", None, "internal"
        message = f"internal error; quote request id {request_id} when reporting it"
        logger.error("request %s failed", request_id, exc_info=exc)
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers), outcome


app = FastAPI(
    title="t2i",
    summary="Text-to-image generation, OpenAI Images API compatible.",
    version="0.1.0",
)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}
    body = {
        "error": {
            "message": message.get(exc.status_code, str(exc.detail)),
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found" if exc.status_code == 404 else None,
        }
    }
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(InvalidRequest(str(exc.errors()[0]["msg"])), "")[0]


_GENERATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ImageRequest.model_json_schema()}},
    }
}


@dataclass
class _State:
    """Where a request is, as the ingress last heard."""

    stage: str
    steps_done: int
    steps_total: int

    def report(self) -> dict:
        return {"stage": self.stage, "steps_done": self.steps_done, "steps_total": self.steps_total}


async def _call(response: DeploymentResponse):
    """Await a handle call; if we are cancelled, cancel the call downstream too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def _settle(task: asyncio.Future) -> None:
    """Wait for a task we cancelled to unwind, even if we are cancelled meanwhile."""
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            continue


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP routes of the service; see DESIGN.md for the API."""

    def __init__(
        self,
        config: AppConfig,
        encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        inflight: DeploymentHandle,
    ):
        self.config = config
        self.encoder, self.denoiser, self.inflight = encoder, denoiser, inflight
        self.metrics = Metrics()
        self._model: dict | None = None
        self._page = resources.files("serve_app").joinpath("web/index.html").read_text()

    # --- model facts, asked of the model replicas once -------------------------------

    async def describe_replicas(self) -> tuple[dict, dict]:
        """describe() of an encoder and a denoiser replica; NotReady if either fails.
        They answer only after load and warm-up."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(self.encoder.describe.remote(), self.denoiser.describe.remote()),
                DESCRIBE_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            raise NotReady(f"the model replicas are not ready ({exc!r})") from exc

    async def model(self) -> dict:
        """Family, presets and limits of the served model (cached after the first answer)."""
        if self._model is None:
            enc, den = await self.describe_replicas()
            self.metrics.start_at_zero(
                den["family"], self.metrics.requests, self.metrics.admission_rejects
            )
            self._model = {
                "id": self.config.served_model_name or den["family"],
                "family": den["family"],
                "presets": den["presets"],
                "default_preset": den["default_preset"],
                "limits": Limits(self.config.min_side, self.config.max_side, den["side_multiple"]),
                "max_prompt_tokens": enc["max_prompt_tokens"],
            }
        return self._model

    # --- routes ----------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: this ingress replica answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: both model replicas answer (they report only after load and warm-up)."""
        try:
            enc, den = await self.describe_replicas()
        except NotReady as exc:
            return error_response(exc, "")[0]
        return JSONResponse({"status": "ready", "encoder": enc, "denoiser": den})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            m = await self.model()
        except NotReady as exc:
            return error_response(exc, "")[0]
        limits: Limits = m["limits"]
        entry = {
            "id": m["id"],
            "object": "model",
            "created": 0,
            "owned_by": "t2i-serve",
            "family": m["family"],
            "presets": m["presets"],
            "default_preset": m["default_preset"],
            "loras": [],
            "limits": {
                "min_side": limits.min_side,
                "max_side": limits.max_side,
                "side_multiple": limits.side_multiple,
                "max_prompt_tokens": m["max_prompt_tokens"],
                "max_images": MAX_IMAGES,
                "max_steps": MAX_STEPS,
            },
        }
        return JSONResponse({"object": "list", "data": [entry]})

    @app.post("/v1/images/generations", openapi_extra=_GENERATION_BODY)
    async def generations(self, request: Request) -> Response:
        """OpenAI Images API: JSON with base64 images, seed, timings (ms) and VRAM peaks."""
        return await self._serve(request, raw=False)

    @app.post("/generate", openapi_extra=_GENERATION_BODY)
    async def generate(self, request: Request) -> Response:
        """Same body; answers the image bytes (image/png unless output_format says else)."""
        return await self._serve(request, raw=True)

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel(self, request_id: str) -> JSONResponse:
        """Cancel one request wherever it runs; 404 if none with this id is in flight."""
        report = await self.inflight.cancel.remote(request_id, self.config.cancel_wait_s)
        if report is None:
            body = {
                "error": {
                    "message": f"no request '{request_id}' is in flight (unknown or finished)",
                    "type": "invalid_request_error",
                    "param": "request_id",
                    "code": "not_found",
                }
            }
            return JSONResponse(body, status_code=404)
        return JSONResponse({"id": request_id, "object": "request.cancellation", **report})

    # --- one generation request --------------------------------------------------------

    async def _serve(self, request: Request, raw: bool) -> Response:
        started = time.monotonic()
        request_id = request.headers.get("x-request-id", "")
        family = self._model["family"] if self._model else "unknown"
        params, result, state = None, None, None
        try:
            if not 0 < len(request_id) <= MAX_REQUEST_ID or not request_id.isprintable():
                raise InvalidRequest(
                    f"X-Request-Id must be 1-{MAX_REQUEST_ID} printable characters",
                    "X-Request-Id",
                )
            req = parse_request(await self._json(request))
            model = await self.model()
            family = model["family"]
            params = self._params(req, model, raw)
            state = _State("queued", 0, params.num_inference_steps)
            result, images, encode_image_s = await self._tracked(
                request_id, params, req, state, b64=not raw
            )
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else None
            if outcome is None:
                response, outcome = error_response(exc, request_id)
            if isinstance(_cause(exc), BackPressureError):  # a full queue turned it away
                self.metrics.admission_rejects.inc(1, tags={"family": family})
            self.metrics.request(family, outcome)
            self._log(request_id, outcome, params, state, time.monotonic() - started, result)
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            return response

        e2e = time.monotonic() - started
        timings = {**result["timings_ms"], "encode_image": round(encode_image_s * 1000, 3)}
        timings["e2e"] = round(e2e * 1000, 3)

        def account() -> None:  # after the answer is sent: off the request's latency
            self.metrics.stage(family, "encode_image", encode_image_s)
            self.metrics.stage(family, "e2e", e2e)
            self.metrics.request(family, "ok")
            self._log(request_id, "ok", params, state, e2e, {**result, "timings_ms": timings})

        if raw:
            server_timing = ", ".join(f"{k};dur={v}" for k, v in timings.items())
            headers = {"X-Seed": str(params.seed), "Server-Timing": server_timing}
            return Response(
                images[0],
                media_type=MEDIA_TYPES[req.output_format],
                headers=headers,
                background=BackgroundTask(account),
            )
        return Response(
            images_body(
                images,
                {
                    "created": int(time.time()),
                    "model": model["id"],
                    "output_format": req.output_format,
                    "size": f"{params.width}x{params.height}",
                    "id": request_id,
                    "seed": params.seed,
                    "num_inference_steps": params.num_inference_steps,
                    "guidance_scale": params.guidance_scale,
                    "timings": timings,
                    "vram": result["vram"],
                },
            ),
            media_type="application/json",
            background=BackgroundTask(account),
        )

    async def _json(self, request: Request) -> object:
        body = await request.body()
        if len(body) > self.config.max_body_bytes:
            raise BodyTooLarge(len(body), self.config.max_body_bytes)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(
                f"the body is not valid JSON: {exc}", None, "invalid_json"
            ) from None

    def _params(self, req: ImageRequest, model: dict, raw: bool) -> GenerationParams:
        if req.model is not None and req.model != model["id"]:
            raise InvalidRequest(
                f"model '{req.model}' is not served here; available: {model['id']}",
                "model",
                "model_not_found",
            )
        if req.lora is not None:
            raise InvalidRequest(
                f"LoRA '{req.lora.name}' is not available; this deployment has none", "lora.name"
            )
        if req.stream:
            raise InvalidRequest("stream=true is not supported yet; omit it", "stream")
        if raw and req.n > 1:
            raise InvalidRequest("POST /generate answers one image; use n=1", "n")
        return resolve(req, model["presets"], model["default_preset"], model["limits"])

    async def _tracked(
        self, request_id: str, params: GenerationParams, req, state: _State, b64: bool
    ):
        """Run a request while listening for a cancel by id (from any ingress replica)."""
        work = asyncio.ensure_future(self._run(request_id, params, req, state, b64))
        listen, report = None, None
        try:
            # Registered while the prompt is being encoded: off the critical path.
            try:
                opened = await _call(self.inflight.open.remote(request_id))
            except Exception:  # noqa: BLE001 - without InFlight, serve the request anyway
                logger.warning("request %s: cancel-by-id unavailable", request_id, exc_info=True)
            else:
                if not opened:
                    work.cancel()
                    await _settle(work)
                    raise DuplicateRequestId(request_id)
                listen = asyncio.ensure_future(_call(self.inflight.watch.remote(request_id)))
            await asyncio.wait({work, listen} - {None}, return_when=asyncio.FIRST_COMPLETED)
            cancel_requested = (
                listen is not None
                and listen.done()
                and not listen.cancelled()
                and listen.exception() is None
                and listen.result()
            )
            if cancel_requested and not work.done():
                work.cancel()
                await _settle(work)
                report = state.report()
                raise Cancelled(state.stage, state.steps_done, state.steps_total)
            await _settle(work)  # if the watch failed, the request still runs to the end
            return work.result()
        except asyncio.CancelledError:  # the client left
            work.cancel()
            await _settle(work)
            report = state.report()
            raise
        finally:
            if listen is not None:
                listen.cancel()  # cancels the pending watch call too
                self.inflight.close.remote(request_id, report)

    async def _run(self, request_id: str, params: GenerationParams, req, state: _State, b64: bool):
        state.stage = "encode"
        called = time.monotonic()
        prompt = await _call(self.encoder.encode.remote(request_id, params))
        encode_call_s = time.monotonic() - called
        state.stage = "queued"
        # By reference (Ray's object store), not gRPC like the other calls: the last
        # message holds the pixels. 10 progress events and 3 MB of pixels took 15.5 ms
        # over gRPC against 4.5 ms by reference on an H100 host (*probe-served-2.json).
        stream = self.denoiser.options(stream=True, _by_reference=True).generate.remote(
            request_id, params, prompt, time.time()
        )

        def encode_all(images: list) -> list[bytes]:
            encoded = [encode_image(i, req.output_format, req.output_compression) for i in images]
            return [pybase64.b64encode(e) for e in encoded] if b64 else encoded

        result, encoding = None, None
        try:
            async for event in stream:
                if isinstance(event, Progress):
                    state.stage, state.steps_done = event.stage, event.steps_done
                elif isinstance(event, Generated):
                    result, received_at = event, time.time()
                    # Encoded while the stream closes behind its last message (1-2 ms
                    # on the dev machine). The encode_image stage runs from here until
                    # the images are encoded and the stream has closed.
                    state.stage, started = "encode_image", time.monotonic()
                    encoding = asyncio.ensure_future(asyncio.to_thread(encode_all, event.images))
        except asyncio.CancelledError:
            stream.cancel()
            if encoding is not None:
                encoding.cancel()  # its thread finishes the image it is on, unread
            raise
        except Exception:
            if encoding is None:
                raise
            # The images are here: only the stream's close failed. Answer with them.
            logger.warning("request %s: the denoiser's stream failed after its images",
                           request_id, exc_info=True)  # fmt: skip
        if encoding is None:
            raise RuntimeError("the denoiser's stream ended without its images")
        images = await encoding
        # Outside every stage: the encoder's call beyond its encode stage (the trips there
        # and back, its queue, the embeddings' copy to the host), and the images' trip
        # from the denoiser (wall clocks of one host, or of hosts as close as their
        # clocks agree).
        transfers = {"encode_transfer": encode_call_s * 1000 - prompt.timings_ms["encode"]}
        if result.sent_at:
            transfers["result_transfer"] = (received_at - result.sent_at) * 1000
        summary = {
            "timings_ms": {
                **prompt.timings_ms,
                **result.timings_ms,
                **{k: round(v, 3) for k, v in transfers.items()},
            },
            "vram": {**prompt.vram, **result.vram},
            "step_ms": result.step_ms,
        }
        return summary, images, time.monotonic() - started

    def _log(self, request_id, outcome, params, state, e2e_s, result) -> None:
        """One structured line per request: enough to trace a slow or heavy one."""
        line = {
            "event": "t2i_request",
            "request_id": request_id,
            "outcome": outcome,
            "e2e_ms": round(e2e_s * 1000, 3),
        }
        if params is not None:
            line.update(
                size=f"{params.width}x{params.height}",
                n=params.num_images,
                steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                seed=params.seed,
            )
        if state is not None and outcome != "ok":
            line["stopped"] = state.report()
        if result is not None:
            line.update(timings_ms=result["timings_ms"], vram=result["vram"])
        logger.info(json.dumps(line))
