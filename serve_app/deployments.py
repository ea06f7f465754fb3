"""The model replicas: thin Serve deployments around the engine.

Each holds an engine object, runs its device work on one worker thread (one request at
a time, in arrival order, off the replica's event loop), turns Serve's cancellation of a
call into the engine's per-request CancelToken, and records metrics. No model math here.

Cancellation: Serve cancels a call when its HTTP client leaves or when the ingress
cancels it. The replica then sees `asyncio.CancelledError`; we set the request's token,
drop the job if it has not started, or else wait for the loop to stop at its next step
boundary. The method returns only then. (Serve may count the slot free as soon as it
cancels; the device stays exclusive because every job runs on the one worker thread:
the next request waiting at this replica starts the moment the loop has stopped.)
"""

import asyncio
import concurrent.futures
import json
import logging
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import ray
from ray import serve

from serve_app.config import ModelSettings
from serve_app.errors import Cancelled, DoesNotFit
from serve_app.messages import EncodedPrompt, Generated, GenerationParams, Progress
from serve_app.metrics import Metrics

logger = logging.getLogger("ray.serve")

GAUGE_REFRESH_S = 5.0
KEEP_CANCELLATIONS = 1000


class DeviceWorker:
    """One thread that runs a replica's device work, one job at a time, in arrival order."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Jobs submitted and not started yet."""
        return self._waiting

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        def start():
            self._add(-1)
            return fn()

        self._add(1)
        fut = self._pool.submit(start)
        fut.add_done_callback(lambda f: f.cancelled() and self._add(-1))
        return fut

    def _add(self, n: int) -> None:
        with self._lock:
            self._waiting += n

    async def stop(self, fut: concurrent.futures.Future, token) -> BaseException | None:
        """Cancel a job: drop it if it has not started, else set its token and wait until
        it returns. Returns how it ended: the engine's `Cancelled`, another error, or None
        if it finished before it saw the token."""
        token.cancel()
        if fut.cancel():
            return Cancelled("queued")
        wrapped = asyncio.wrap_future(fut)
        while not wrapped.done():
            try:
                await asyncio.wait({wrapped})
            except asyncio.CancelledError:
                continue  # cancelled again: still wait, the device is not free yet
        return fut.exception()


def _log_failure(fut: concurrent.futures.Future) -> None:
    if fut.exception() is not None:
        logger.error("recording metrics failed", exc_info=fut.exception())


def _gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def _vram(device, weights_bytes: int) -> dict[str, int]:
    import torch

    kinds = ("allocated", "reserved", "free", "total", "weights")
    if device.type != "cuda":
        return dict.fromkeys(kinds, 0)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "free": free,
        "total": total,
        "weights": weights_bytes,
    }


def _module_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class _Replica:
    """What both model replicas share: worker thread, metrics, gauges, cancel records."""

    def _start(self, engine, weights) -> None:
        self.engine = engine
        self.family = engine.family
        self.worker = DeviceWorker()
        self.metrics = Metrics()
        self.cancellations: OrderedDict[str, dict] = OrderedDict()
        self.weights_bytes = _module_bytes(*weights)
        threading.Thread(target=self._refresh_gauges, daemon=True).start()

    def _refresh_gauges(self) -> None:
        """Refresh the per-replica gauges forever, requests or not (a daemon thread)."""
        while True:
            self.metrics.refresh(self.worker.waiting, _vram(self.engine.device, self.weights_bytes))
            time.sleep(GAUGE_REFRESH_S)

    def _record_cancel(self, request_id: str, record: dict) -> None:
        self.cancellations[request_id] = record
        while len(self.cancellations) > KEEP_CANCELLATIONS:
            self.cancellations.popitem(last=False)
        logger.info("request %s cancelled: %s", request_id, json.dumps(record))

    def cancellation(self, request_id: str) -> dict | None:
        """Where a recently cancelled request stopped on this replica: its stage and, for
        the denoiser, steps done and how long the loop took to stop after the signal.
        None if this replica has no record of it (the last 1000 are kept)."""
        return self.cancellations.get(request_id)

    def _describe(self) -> dict:
        return {
            "family": self.family,
            "device": str(self.engine.device),
            "gpu_ids": _gpu_ids(),
            "queue_depth": self.worker.waiting,
            "vram": _vram(self.engine.device, self.weights_bytes),
        }


@serve.deployment
class PromptEncoder(_Replica):
    """Prompt -> embeddings, on a fraction of a GPU (`num_gpus` in deploy/*.yaml)."""

    def __init__(self, settings: ModelSettings):
        from serve_app.engine import load_encoder  # torch is imported by model replicas only

        started = time.monotonic()
        # Not compiled: on an H200 that cut a 65-token encode from 31 to 12 ms
        # (results/*-levers-2.json) but took 234 s of start-up (*-bench-0.json).
        engine = load_encoder(settings.model, settings.device, settings.dtype)
        self._start(engine, [engine.text_encoder])
        self.warmup_s = engine.warmup()
        self.ready_s = time.monotonic() - started
        logger.info("PromptEncoder ready in %.1f s (warm-up %.1f s)", self.ready_s, self.warmup_s)

    async def encode(self, request_id: str, params: GenerationParams) -> EncodedPrompt:
        from serve_app.engine.cancel import CancelToken
        from serve_app.engine.stages import StageRecorder

        token, recorder = CancelToken(), StageRecorder(self.engine.device)

        def job():
            with recorder.stage("encode"):
                return self.engine.encode(
                    params.prompt, params.negative_prompt, params.uses_guidance, cancel=token
                )

        fut = self.worker.submit(job)
        self.metrics.queue_depth.set(self.worker.waiting)
        try:
            emb = await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            ended = await self.worker.stop(fut, token)
            queued = isinstance(ended, Cancelled) and ended.stage == "queued"
            self._record_cancel(request_id, {"stage": "queued" if queued else "encode"})
            raise
        finally:
            self.metrics.queue_depth.set(self.worker.waiting)
        rec = recorder.stages["encode"]
        self.metrics.stage(self.family, "encode", rec.seconds, rec.vram_peak_bytes)
        prompt, negative, dtype = emb.to_arrays()
        return EncodedPrompt(prompt, negative, dtype, recorder.timings_ms(), recorder.vram_peaks())

    def describe(self) -> dict:
        return {
            **self._describe(),
            "max_prompt_tokens": self.engine.max_tokens,
            "ready_s": round(self.ready_s, 3),
            "warmup_s": self.warmup_s,
        }


@serve.deployment
class Denoiser(_Replica):
    """Embeddings -> images (step loop + VAE decode), on a whole GPU (or 0.75 of one)."""

    def __init__(self, settings: ModelSettings):
        from serve_app.engine import load_denoiser

        started = time.monotonic()
        engine = load_denoiser(
            settings.model,
            settings.device,
            settings.dtype,
            settings.attention_backend,
            settings.compile,
            settings.fuse_projections,
        )
        self._start(engine, [engine.transformer, engine.vae])
        self.metrics.start_at_zero(self.family, self.metrics.cancelled_steps, self.metrics.oom)
        # Metrics of a finished request are recorded here, after its answer has gone.
        self.accounting = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        loaded = time.monotonic()
        smallest = engine.side_multiple * 16
        self.warmup_s = engine.warmup(settings.parsed_warmup_sizes() or [(smallest, smallest)])
        self.ready_s = time.monotonic() - started
        logger.info(
            "Denoiser ready in %.1f s on %s (load %.1f s, warm-up %s)",
            self.ready_s,
            engine.device,
            loaded - started,
            self.warmup_s,
        )

    async def generate(
        self, request_id: str, params: GenerationParams, prompt: EncodedPrompt, sent_at: float
    ) -> AsyncIterator[Progress | Generated]:
        """Stream Progress events, then one Generated. Call with `stream=True`.

        Args:
            request_id: for logs and cancel records.
            params: what to draw.
            prompt: the encoder's answer for `params`.
            sent_at: time.time() when the caller sent the call (for the queue time).

        Raises (at the caller): DoesNotFit when the device runs out of memory.
        """
        from serve_app.engine.cancel import CancelToken
        from serve_app.engine.stages import StageRecorder
        from serve_app.engine.zimage import PromptEmbeddings

        token, recorder = CancelToken(), StageRecorder(self.engine.device)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        started: list[float] = []

        def report(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Progress(stage, done, total))

        def job():
            started.append(time.time())
            report("denoise", 0, params.num_inference_steps)
            emb = PromptEmbeddings.from_arrays(prompt.prompt, prompt.negative, prompt.dtype)
            return self.engine.generate(params, emb, token, recorder, progress=report)

        fut = self.worker.submit(job)
        self.metrics.queue_depth.set(self.worker.waiting)
        wrapped, getter = asyncio.wrap_future(fut), None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, wrapped}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield getter.result()
            while not events.empty():
                yield events.get_nowait()
            images = wrapped.result()
        except (asyncio.CancelledError, GeneratorExit):
            if getter is not None:
                getter.cancel()
            ended = await self.worker.stop(fut, token)
            self._account_cancel(request_id, params, ended, token, recorder.step_seconds)
            raise
        except DoesNotFit as exc:
            self.metrics.oom.inc(1, tags={"family": self.family})
            logger.warning("request %s: %s", request_id, exc)
            raise
        finally:
            self.metrics.queue_depth.set(self.worker.waiting)

        queue_s, steps = started[0] - sent_at, recorder.step_seconds

        def account() -> None:
            for name, rec in recorder.stages.items():
                self.metrics.stage(self.family, name, rec.seconds, rec.vram_peak_bytes)
            self.metrics.stage(self.family, "queue", queue_s)
            self.metrics.steps(self.family, steps, params.width, params.height)

        try:
            yield Generated(
                images=images,
                timings_ms={"queue": round(queue_s * 1000, 3), **recorder.timings_ms()},
                vram=recorder.vram_peaks(),
                step_ms=round(statistics.median(steps) * 1000, 3) if steps else 0.0,
                sent_at=time.time(),
            )
        finally:  # on another thread: the caller waits for this stream's end
            self.accounting.submit(account).add_done_callback(_log_failure)

    def _account_cancel(self, request_id, params, ended, token, step_seconds) -> None:
        total = params.num_inference_steps
        if isinstance(ended, Cancelled):
            stage, done = ended.stage, ended.steps_done
        else:  # it finished (or failed) before it saw the token
            stage, done = "done", total
        latency = None
        if token.signalled_at is not None and stage != "queued":
            latency = time.monotonic() - token.signalled_at
        self.metrics.cancelled(self.family, total - done, latency)
        self._record_cancel(
            request_id,
            {
                "stage": stage,
                "steps_done": done,
                "steps_total": total,
                "stop_latency_s": latency,
                "max_step_s": max(step_seconds, default=None),
            },
        )

    def describe(self) -> dict:
        return {
            **self._describe(),
            "presets": self.engine.presets,
            "default_preset": self.engine.default_preset,
            "side_multiple": self.engine.side_multiple,
            "ready_s": round(self.ready_s, 3),
            "warmup_s": self.warmup_s,
        }
