"""One generation request's trip: registered for cancel by id, encoded by its model's
PromptEncoder, drawn by its Denoiser (streamed progress, then the images), encoded to
PNG/WebP/JPEG. Every exit (a client that leaves, a cancel by id, an error) cancels what
is still running downstream."""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pybase64
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.errors import Busy, Cancelled, ReplicaFailed
from serve_app.imaging import encode_image
from serve_app.inflight import DuplicateRequestId
from serve_app.ingress.admission import FullModels
from serve_app.ingress.detached import detached
from serve_app.messages import Generated, GenerationParams, Preview, Progress

logger = logging.getLogger("ray.serve")

# How long InFlight's refusal of a full model stands in an ingress replica that closes
# none of the model's requests meanwhile (ingress/admission.py): a slot freed through
# another ingress replica is taken at most this late.
FULL_HOLD_S = 0.25


@dataclass
class State:
    """Where a request is, as the ingress last heard."""

    stage: str
    steps_done: int
    steps_total: int

    def report(self) -> dict:
        return {"stage": self.stage, "steps_done": self.steps_done, "steps_total": self.steps_total}


@dataclass
class Result:
    """A finished generation.

    Args:
        images: the encoded images (base64 when asked).
        timings_ms: per stage, and the hops between replicas.
        vram: peak device bytes per stage.
        step_ms: median denoising step.
        encode_image_s: from the images' arrival to their encoding's end.
    """

    images: list[bytes]
    timings_ms: dict[str, float]
    vram: dict[str, int]
    step_ms: float
    encode_image_s: float


@dataclass(frozen=True)
class Encoding:
    """How the images are handed back: format, OpenAI's output_compression, base64."""

    output_format: str = "png"
    compression: int | None = None
    b64: bool = True

    def __call__(self, images: list) -> list[bytes]:
        encoded = [encode_image(i, self.output_format, self.compression) for i in images]
        return [pybase64.b64encode(e) for e in encoded] if self.b64 else encoded


async def _call(response: DeploymentResponse):
    """Await a handle call; if we are cancelled, cancel the call downstream too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def replica_died(exc: BaseException) -> bool:
    """Whether a call failed because the replica serving it died (or became unreachable)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return isinstance(exc, RayActorError)


async def settle(task: asyncio.Future) -> None:
    """Wait for a task we cancelled to unwind, even if we are cancelled meanwhile."""
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            continue


class Flow:
    """Args:
    inflight: the InFlight deployment (which requests run where).
    encoders, denoisers: model id -> handle.
    """

    def __init__(
        self,
        inflight: DeploymentHandle,
        encoders: dict[str, DeploymentHandle],
        denoisers: dict[str, DeploymentHandle],
    ):
        self.inflight, self.encoders, self.denoisers = inflight, encoders, denoisers
        self.full = FullModels(FULL_HOLD_S)
        self._closing: set[asyncio.Task] = set()

    def _close(self, request_id: str, model_id: str, report: dict | None, owner: str) -> None:
        """Close the request's InFlight record, in the background (the caller may be
        unwinding a cancellation), retried: a record left open holds its key's and its
        model's admission slot until it goes stale. Detached from the request: Serve
        cancels a cancelled request's calls, and this one was, now and then (CI)."""
        task = detached(self._close_retried(request_id, model_id, report, owner))
        self._closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._closing.discard)

    async def _close_retried(self, request_id, model_id, report, owner, attempts=6) -> None:
        for attempt in range(attempts):
            try:
                await self.inflight.close.remote(request_id, report, owner)
                self.full.closed(model_id)
                return
            except Exception:  # noqa: BLE001 - retried, then logged
                if attempt == attempts - 1:
                    logger.exception("request %s: its in-flight record could not be closed; "
                                     "it goes stale on its own", request_id)  # fmt: skip
                    return
                await asyncio.sleep(0.25 * 2**attempt)

    async def run(
        self,
        request_id: str,
        model_id: str,
        params: GenerationParams,
        encoding: Encoding,
        state: State,
        on_event: Callable[[Progress | Preview], None] | None = None,
        key: str | None = None,
        key_limit: int | None = None,
    ) -> Result:
        """Admit a request, then run it while listening for a cancel by id (from any
        ingress replica).

        Args:
            on_event: told of each Progress and Preview the denoiser streams.
            key, key_limit: the request's API key name and the in-flight limit per key.

        Raises: Busy when the model or the key has as many requests in flight as it
        takes; Cancelled when cancelled by id; DuplicateRequestId; ReplicaFailed; what
        the replicas raise. A client that leaves cancels this coroutine, and with it
        everything.
        """
        known = self.full.refusal(model_id)
        if known is not None:  # full when InFlight last said, and nothing closed since
            raise known
        registered, owner, closes = False, uuid.uuid4().hex, self.full.closes(model_id)
        opening = self.inflight.open.remote(request_id, model_id, key, key_limit, owner)
        try:
            refusal = await _call(opening)
        except asyncio.CancelledError:  # the client left: its record may have been made
            self._close(request_id, model_id, None, owner)
            raise
        except Exception:  # noqa: BLE001 - without InFlight, serve the request anyway
            logger.warning("request %s: admission and cancel-by-id unavailable", request_id,
                           exc_info=True)  # fmt: skip
        else:
            registered = refusal is None
            if refusal is not None and refusal["reason"] == "duplicate":
                raise DuplicateRequestId(request_id)
            if refusal is not None:
                busy = Busy(refusal["reason"], refusal["limit"], refusal["retry_after_s"])
                self.full.refused(model_id, busy, closes)
                raise busy
        work = asyncio.ensure_future(
            self._run(request_id, model_id, params, encoding, state, on_event)
        )
        listen, report = None, None
        try:
            if registered:
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
                await settle(work)
                report = state.report()
                raise Cancelled(state.stage, state.steps_done, state.steps_total)
            await settle(work)  # if the watch failed, the request still runs to the end
            return work.result()
        except asyncio.CancelledError:  # the client left
            work.cancel()
            await settle(work)
            report = state.report()
            raise
        finally:
            if listen is not None:
                listen.cancel()  # cancels the pending watch call too
            if registered:
                self._close(request_id, model_id, report, owner)

    async def _run(self, request_id, model_id, params, encoding, state, on_event) -> Result:
        """The request's trip. A replica that dies under it is retried once, on the
        replica Ray has or starts, while nothing of the request has reached its client;
        after that (a stream's events sent), ReplicaFailed."""
        told: list[bool] = []

        def tell(event) -> None:
            told.append(True)
            on_event(event)

        for attempt in (1, 2):
            try:
                return await self._attempt(
                    request_id, model_id, params, encoding, state, on_event and tell
                )
            except Exception as exc:
                if not replica_died(exc):
                    raise
                if attempt == 2 or told:
                    raise ReplicaFailed(f"{state.stage} ({model_id})") from exc
                logger.warning("request %s: a replica died in %s; retrying once",
                               request_id, state.stage)  # fmt: skip
        raise AssertionError("unreachable")

    async def _attempt(self, request_id, model_id, params, encoding, state, on_event) -> Result:
        state.stage = "encode"
        called = time.monotonic()
        prompt = await _call(self.encoders[model_id].encode.remote(request_id, params))
        encode_call_s = time.monotonic() - called
        state.stage = "queued"
        # By reference (Ray's object store), not gRPC like the other calls: the last
        # message holds the pixels. 10 progress events and 3 MB of pixels took 15.5 ms
        # over gRPC against 4.5 ms by reference on an H100 host (*probe-served-2.json).
        # A request with adapters goes to a replica that holds its first (multiplexing).
        options = {"stream": True, "_by_reference": True}
        if params.loras:
            options["multiplexed_model_id"] = params.loras[0].name
        stream = (
            self.denoisers[model_id]
            .options(**options)
            .generate.remote(request_id, params, prompt, time.time())
        )
        result, encoding_task = None, None
        try:
            async for event in stream:
                if isinstance(event, Progress):
                    state.stage, state.steps_done = event.stage, event.steps_done
                    if on_event is not None:
                        on_event(event)
                elif isinstance(event, Preview):
                    if on_event is not None:
                        on_event(event)
                elif isinstance(event, Generated):
                    result, received_at = event, time.time()
                    # Encoded while the stream closes behind its last message (1-2 ms
                    # on the dev machine). The encode_image stage runs from here until
                    # the images are encoded and the stream has closed.
                    state.stage, started = "encode_image", time.monotonic()
                    encoding_task = asyncio.ensure_future(asyncio.to_thread(encoding, event.images))
        except asyncio.CancelledError:
            stream.cancel()
            if encoding_task is not None:
                encoding_task.cancel()  # its thread finishes the image it is on, unread
            raise
        except Exception:
            if encoding_task is None:
                raise
            # The images are here: only the stream's close failed. Answer with them.
            logger.warning("request %s: the denoiser's stream failed after its images",
                           request_id, exc_info=True)  # fmt: skip
        if encoding_task is None:
            raise RuntimeError("the denoiser's stream ended without its images")
        images = await encoding_task
        # Outside every stage: the encoder's call beyond its encode stage (the trips there
        # and back, its queue, the embeddings' copy to the host), and the images' trip
        # from the denoiser (wall clocks of one host, or of hosts as close as their
        # clocks agree).
        transfers = {"encode_transfer": encode_call_s * 1000 - prompt.timings_ms["encode"]}
        if result.sent_at:
            transfers["result_transfer"] = (received_at - result.sent_at) * 1000
        return Result(
            images=images,
            timings_ms={
                **prompt.timings_ms,
                **result.timings_ms,
                **{k: round(v, 3) for k, v in transfers.items()},
            },
            vram={**prompt.vram, **result.vram},
            step_ms=result.step_ms,
            encode_image_s=time.monotonic() - started,
        )
