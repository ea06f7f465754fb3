"""The HTTP edge: routes as small functions over a catalog of models and one generation
flow. It never imports torch: the model replicas answer in numpy and plain Python
(serve_app/messages.py). Errors are answered from one table (ingress/errors.py)."""

import asyncio
import json
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from serve_app import vram
from serve_app.config import AppConfig
from serve_app.errors import DeadlineExceeded, UnknownLora
from serve_app.ingress.answers import image_answer, json_answer
from serve_app.ingress.catalog import Catalog, Model
from serve_app.ingress.errors import (
    BodyTooLarge,
    NotFound,
    NotReady,
    error_body,
    error_response,
)
from serve_app.ingress.flow import Encoding, Flow, State, settle
from serve_app.ingress.guard import RefuseTrustedHeaders
from serve_app.ingress.keys import Keys, Unauthorized
from serve_app.ingress.openapi import GENERATION_BODY, add_body_schemas
from serve_app.ingress.outcomes import Outcomes, timings_of
from serve_app.ingress.streaming import stream_answer
from serve_app.messages import GenerationParams
from serve_app.metrics import Metrics
from serve_app.schema import ImageRequest, InvalidRequest, parse_request, resolve

MAX_REQUEST_ID = 128

app = FastAPI(
    title="t2i",
    summary="Text-to-image generation, OpenAI Images API compatible.",
    version="0.1.0",
)
app.add_middleware(RefuseTrustedHeaders)
add_body_schemas(app)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}
    body = error_body(
        message.get(exc.status_code, str(exc.detail)),
        "invalid_request_error",
        None,
        "not_found" if exc.status_code == 404 else None,
    )
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(InvalidRequest(str(exc.errors()[0]["msg"])), "")[0]


# Module functions the class calls stand above it: serve.ingress serializes the class
# when it decorates it, with the module's names as they are at that point.


def _check_request_id(request_id: str) -> None:
    if not 0 < len(request_id) <= MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidRequest(
            f"X-Request-Id must be 1-{MAX_REQUEST_ID} printable characters", "X-Request-Id"
        )


def _check_loras(params: GenerationParams, model: Model) -> None:
    """Refuse adapters the model does not have (422) or more than it combines (400)."""
    names = [lora["name"] for lora in model.loras]
    for choice in params.loras:
        if choice.name not in names:
            raise UnknownLora(choice.name, names)
    if len(params.loras) > model.lora_slots:
        raise InvalidRequest(
            f"{len(params.loras)} LoRAs asked for; model '{model.id}' combines at most "
            f"{model.lora_slots} in one request",
            "lora",
            "too_many_loras",
        )


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP routes of the service; see DESIGN.md for the API.

    Args:
        config: the application's settings.
        encoders, denoisers: model id -> its PromptEncoder / Denoiser deployment.
        inflight: the InFlight deployment (cancel by id).
    """

    def __init__(
        self,
        config: AppConfig,
        encoders: dict[str, DeploymentHandle],
        denoisers: dict[str, DeploymentHandle],
        inflight: DeploymentHandle,
    ):
        self.config = config
        self.metrics = Metrics()
        self.outcomes = Outcomes(self.metrics)
        self.catalog = Catalog(config, encoders, denoisers, inflight, self._first_sight)
        self.flow = Flow(inflight, encoders, denoisers)
        self.inflight = inflight
        self.keys = Keys.from_settings(config.api_keys) if config.api_keys else None
        self._page = resources.files("serve_app").joinpath("web/index.html").read_text()

    def _first_sight(self, model: Model) -> None:
        self.metrics.start_at_zero(
            model.family, model.id, self.metrics.requests, self.metrics.admission_rejects
        )

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
        """Readiness: each model's replicas answer (they do only after load and warm-up),
        or it is idle (scaled to zero: a request starts a replica). 200 when every model
        is ready or idle, 200 "degraded" when some are, else 503."""
        models = await self.catalog.readiness()
        ready = sum(m["status"] in ("ready", "idle") for m in models.values())
        if not ready:
            body = error_body("no model is ready", "service_unavailable", None, "not_ready")
            return JSONResponse({**body, "models": models}, status_code=503)
        status = "ready" if ready == len(models) else "degraded"
        return JSONResponse({"status": status, "models": models})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """OpenAI's model list: each served model with family, presets, LoRAs, limits.
        Models whose replicas are not ready yet are left out (an idle one never seen is
        woken in the background)."""
        try:
            self._key(request)
        except Unauthorized as exc:
            return error_response(exc, "")[0]
        asked = await asyncio.gather(
            *(self.catalog.model(i, wake=False) for i in self.catalog.ids),
            return_exceptions=True,
        )
        data = [m.listing() for m in asked if not isinstance(m, BaseException)]
        if not data:
            return error_response(NotReady("no model is ready"), "")[0]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/images/generations", openapi_extra=GENERATION_BODY)
    async def generations(self, request: Request) -> Response:
        """OpenAI Images API: JSON with base64 images, seed, timings (ms) and VRAM peaks."""
        return await self._generation(request, raw=False)

    @app.post("/generate", openapi_extra=GENERATION_BODY)
    async def generate(self, request: Request) -> Response:
        """Same body; answers the image bytes (image/png unless output_format says else)."""
        return await self._generation(request, raw=True)

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel(self, request_id: str, request: Request) -> JSONResponse:
        """Cancel one request wherever it runs; 404 if none with this id is in flight."""
        try:
            self._key(request)
        except Unauthorized as exc:
            return error_response(exc, request_id)[0]
        report = await self.inflight.cancel.remote(request_id, self.config.cancel_wait_s)
        if report is None:
            missing = NotFound(
                f"no request '{request_id}' is in flight (unknown or finished)", "request_id"
            )
            return error_response(missing, request_id)[0]
        return JSONResponse({"id": request_id, "object": "request.cancellation", **report})

    # --- one generation request --------------------------------------------------------

    async def _generation(self, request: Request, raw: bool) -> Response:
        started = time.monotonic()
        request_id = request.headers.get("x-request-id", "")
        model, params, state = None, None, None
        try:
            _check_request_id(request_id)
            key = self._key(request)
            req = parse_request(await self._json(request))
            model_id = self.catalog.known(req.model)
            model = await self.catalog.model(model_id)
            params = self._params(req, model, raw)
            if params.loras:
                model = await self.catalog.with_loras(model_id, [c.name for c in params.loras])
                _check_loras(params, model)
            vram.check_fits(model.family, params, model.memory, model.limits)
            state = State("queued", 0, params.num_inference_steps)
            encoding = Encoding(req.output_format, req.output_compression, b64=not raw)
            run = self._runner(request_id, model, params, encoding, state, started, key)
            if req.stream:
                return await self._stream(request_id, model, params, req, run, state, started)
            result = await run()
        except BaseException as exc:
            response = self.outcomes.failed(exc, request_id, model, params, state, started)
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            return response
        timings = timings_of(result, started)
        after = BackgroundTask(
            self.outcomes.succeeded, request_id, model, params, state, result, timings
        )
        if raw:
            return image_answer(req.output_format, params, result, timings, after)
        return json_answer(request_id, model.id, req.output_format, params, result, timings, after)

    def _key(self, request: Request) -> str | None:
        """The request's API key name (None with keys off); raises Unauthorized."""
        if self.keys is None:
            return None
        return self.keys.identify(request.headers.get("authorization"))

    def _runner(self, request_id, model: Model, params, encoding, state, started, key):
        """The request's flow, to be run (with or without an event listener) within the
        service's deadline: past it, cancelled and DeadlineExceeded (504)."""
        limit = self.config.request_timeout_s
        key_limit = self.config.api_keys.max_in_flight if self.config.api_keys else None

        async def run(on_event=None):
            deadline = asyncio.timeout(limit - (time.monotonic() - started))
            try:
                async with deadline:
                    return await self.flow.run(
                        request_id, model.id, params, encoding, state, on_event, key, key_limit
                    )
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise DeadlineExceeded(limit, state.stage) from None

        return run

    async def _stream(self, request_id, model: Model, params, req, run, state, started):
        """Start the generation and answer with its events once it runs; what fails
        before its first event is answered as JSON, like a request without stream."""
        events: asyncio.Queue = asyncio.Queue()
        work = asyncio.ensure_future(run(events.put_nowait))
        first = asyncio.ensure_future(events.get())
        try:
            await asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client left before it started
            first.cancel()
            work.cancel()
            await settle(work)
            raise
        if not first.done():
            first.cancel()
            work.result()  # raises: the caller answers with the error as JSON

        def completed_fields(result) -> dict:
            return {
                "id": request_id,
                "model": model.id,
                "seed": params.seed,
                "num_inference_steps": params.num_inference_steps,
                "guidance_scale": params.guidance_scale,
                "loras": [{"name": c.name, "scale": c.scale} for c in params.loras],
                "timings": timings_of(result, started),
                "vram": result.vram,
            }

        def on_end(exc: BaseException | None, result, timings) -> dict | None:
            if exc is None:
                self.outcomes.succeeded(request_id, model, params, state, result, timings)
                return None
            response = self.outcomes.failed(exc, request_id, model, params, state, started)
            return json.loads(response.body)

        async def stop() -> None:
            work.cancel()
            await settle(work)

        return stream_answer(
            first.result(),
            events,
            work,
            params,
            req.output_format,
            req.output_compression,
            started,
            completed_fields,
            on_end,
            stop,
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

    def _params(self, req: ImageRequest, model: Model, raw: bool) -> GenerationParams:
        if raw and req.stream:
            raise InvalidRequest(
                "POST /generate answers image bytes; stream on POST /v1/images/generations",
                "stream",
            )
        if req.stream and req.n > 1:
            raise InvalidRequest("stream=true draws one image; use n=1", "n")
        if raw and req.n > 1:
            raise InvalidRequest("POST /generate answers one image; use n=1", "n")
        return resolve(req, model.presets, model.default_preset, model.limits)
