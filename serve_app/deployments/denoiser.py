"""The Denoiser replica: embeddings -> images (step loop + VAE decode), on a whole GPU
(or most of one), with the request's adapters applied."""

import asyncio
import concurrent.futures
import logging
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from serve_app.config import ModelSettings
from serve_app.deployments.adapters import Adapters
from serve_app.deployments.memory import ReplicaMemory, cap_memory
from serve_app.deployments.replica import Replica
from serve_app.errors import Cancelled, DoesNotFit
from serve_app.messages import EncodedPrompt, Generated, GenerationParams, Preview, Progress
from serve_app.relay import relay

logger = logging.getLogger("ray.serve")


def _log_failure(fut: concurrent.futures.Future) -> None:
    if fut.exception() is not None:
        logger.error("recording metrics failed", exc_info=fut.exception())


def lora_folder(settings: ModelSettings, checkpoint: Path) -> Path | None:
    """The model's adapter folder: `lora_dir`, or with "auto" the checkpoint's `loras/`
    if it has one; None for a model without adapters."""
    if settings.lora_dir is None:
        return None
    if settings.lora_dir == "auto":
        folder = checkpoint / "loras"
        return folder if folder.is_dir() else None
    folder = Path(settings.lora_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model {settings.id!r}: lora_dir {str(folder)!r} is not a folder")
    return folder


def compile_cache_folder(settings: ModelSettings) -> Path | None:
    """Where the model's compiled graphs are kept (`compile_cache_dir`; "auto": in the
    checkpoint cache); None: torch's default."""
    from serve_app.engine import checkpoint

    if settings.compile_cache_dir is None:
        return None
    if settings.compile_cache_dir == "auto":
        return checkpoint.cache_dir() / "compile"
    return Path(settings.compile_cache_dir).expanduser()


@serve.deployment
class Denoiser(Replica):
    """One model's step loop and VAE; `num_gpus`, replicas and queue limits in
    deploy/*.yaml under `Denoiser-<model id>`."""

    def __init__(self, settings: ModelSettings):
        from serve_app.engine import LoraOptions, checkpoint, load_denoiser
        from serve_app.engine.compiling import compile_cache_stats

        started = time.monotonic()
        cap = cap_memory(settings)  # on a GPU with a cap, CUDA starts here
        capped = time.monotonic()
        folder = lora_folder(settings, checkpoint.resolve(settings.model)[0])
        compile_cache = compile_cache_folder(settings)
        lora = None
        if folder is not None:
            lora = LoraOptions(settings.lora.slots, settings.lora.max_rank, settings.lora.mode)
        engine = load_denoiser(
            settings.model,
            settings.device,
            settings.dtype,
            settings.attention_backend,
            settings.compile,
            settings.options,
            lora,
            compile_cache,
        )
        super().__init__(engine, settings)
        self.adapters = Adapters(engine, folder, settings.lora, self.metrics, self.labels)
        self.presets = settings.presets
        self.default_preset = settings.default_preset
        self._check_presets()
        self.metrics.start_at_zero(*self.labels, self.metrics.cancelled_steps, self.metrics.oom)
        # Metrics of a finished request are recorded here, after its answer has gone.
        self.accounting = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        loaded = time.monotonic()
        # On a CPU nothing is compiled and first calls cost no more than later ones: the
        # smallest size alone checks that the model runs.
        smallest = engine.side_multiple * 16
        sizes = settings.parsed_warmup_sizes() if engine.device.type == "cuda" else []
        self.warmup_s = engine.warmup(sizes or [(smallest, smallest)])
        # What the warm-up compiled and what it loaded from an earlier start's cache.
        self.compile_cache = {"dir": compile_cache and str(compile_cache), **compile_cache_stats()}
        self.memory = ReplicaMemory.measure(
            engine, settings.memory, self.weights_bytes, self.adapters.cache.nbytes, cap
        )
        done = time.monotonic()
        self.ready_s = done - started
        # Where the start-up went: the cap (CUDA's start, with a cap); imports, reading
        # the checkpoint and setting up (compile wrappers, adapters' slots); copying the
        # weights to the device; the warm-up's sizes; and what follows them (the
        # preview map's fit, the cache given back, the memory reading).
        warmup_total = sum(self.warmup_s.values())
        self.startup_s = {
            "cap": capped - started,
            "read_and_setup": loaded - capped - engine.to_device_s,
            "to_device": engine.to_device_s,
            "warmup": warmup_total,
            "after_warmup": done - loaded - warmup_total,
        }
        self.startup_s = {key: round(value, 3) for key, value in self.startup_s.items()}
        logger.info(
            "Denoiser %s ready in %.1f s on %s (%s; warm-up by size %s; compiled graphs: %s)",
            self.model_id,
            self.ready_s,
            engine.device,
            self.startup_s,
            self.warmup_s,
            self.compile_cache,
        )
        if engine.lora is not None and (host_bytes := engine.lora.host_bytes):
            logger.info(
                "Denoiser %s merges adapters from a %.2f GiB host copy of the adapted weights",
                self.model_id,
                host_bytes / 2**30,
            )

    def _check_presets(self) -> None:
        """Every preset drawable by this model, the default among them; refused at start."""
        presets = self.presets_offered()
        if self.default_preset is None:
            self.default_preset = (
                self.engine.default_preset if self.presets is None else next(iter(presets))
            )
        if self.default_preset not in presets:
            raise ValueError(
                f"model {self.model_id!r}: default_preset {self.default_preset!r} is not "
                f"among its presets: {', '.join(presets)}"
            )
        multiple, slots = self.engine.side_multiple, self.adapters.settings.slots
        for name, preset in presets.items():
            if preset["width"] % multiple or preset["height"] % multiple:
                raise ValueError(
                    f"model {self.model_id!r}: preset {name!r} is {preset['width']}x"
                    f"{preset['height']}; this model's sides are multiples of {multiple}"
                )
            if len(preset["loras"]) > slots:
                raise ValueError(
                    f"model {self.model_id!r}: preset {name!r} names {len(preset['loras'])} "
                    f"LoRAs; lora.slots is {slots}"
                )

    def presets_offered(self) -> dict[str, dict]:
        """The model's presets; an adapter of a preset stays only while its file is in
        the model's LoRA folder."""
        if self.presets is None:
            presets = self.engine.presets
        else:
            presets = {name: p.model_dump() for name, p in self.presets.items()}
        there = set(self.adapters.available())
        return {
            name: {**p, "loras": [lo for lo in p.get("loras", []) if lo["name"] in there]}
            for name, p in presets.items()
        }

    async def generate(
        self, request_id: str, params: GenerationParams, prompt: EncodedPrompt, sent_at: float
    ) -> AsyncIterator[Progress | Preview | Generated]:
        """Stream Progress events (and the Previews asked for), then one Generated. Call
        with `stream=True` and, for a request with adapters, `multiplexed_model_id` set
        to its first adapter's name.

        Args:
            request_id: for logs and cancel records.
            params: what to draw.
            prompt: the encoder's answer for `params`.
            sent_at: time.time() when the caller sent the call (for the queue time).

        Raises (at the caller): DoesNotFit when the device runs out of memory; LoraError
        when an adapter is unknown or unusable.
        """
        from serve_app.engine.cancel import CancelToken
        from serve_app.engine.embeddings import from_arrays
        from serve_app.engine.stages import StageRecorder

        token, recorder = CancelToken(), StageRecorder(self.engine.device)
        try:
            adapters = await self.adapters.acquire(params.loras)  # releases what it took
        except asyncio.CancelledError:  # left while its adapter was loading: never queued
            self._account_cancel(request_id, params, Cancelled("queued"), token, [])
            raise
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        started: list[float] = []
        loras = [(a, c.scale) for a, c in zip(adapters, params.loras, strict=True)]

        def report(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Progress(stage, done, total))

        def preview(index: int, done: int, pixels) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Preview(index, done, pixels))

        def job():
            started.append(time.time())
            report("denoise", 0, params.num_inference_steps)
            embeddings = from_arrays(prompt.tensors, prompt.dtypes)
            return self.engine.generate(params, embeddings, token, recorder, report, loras, preview)

        try:
            fut = self.worker.submit(job)
        except BaseException:
            self.adapters.release(adapters)
            raise
        self.metrics.queue_depth.set(self.worker.waiting)
        wrapped = asyncio.wrap_future(fut)
        try:
            async for event in relay(events, wrapped):
                yield event
            images = wrapped.result()
        except (asyncio.CancelledError, GeneratorExit):
            ended = await self.worker.stop(fut, token)
            self._account_cancel(request_id, params, ended, token, recorder.step_seconds)
            raise
        except DoesNotFit as exc:
            self.ran_out_of_memory(request_id, exc)
            raise
        finally:
            self.metrics.queue_depth.set(self.worker.waiting)
            if fut.done():
                self.adapters.release(adapters)
            else:  # still running: its adapters stay pinned until it stops
                wrapped.add_done_callback(lambda _: self.adapters.release(adapters))

        self.ooms_in_a_row = 0
        queue_s, steps = started[0] - sent_at, recorder.step_seconds
        try:
            yield Generated(
                images=images,
                timings_ms={"queue": round(queue_s * 1000, 3), **recorder.timings_ms()},
                vram=recorder.vram_peaks(),
                step_ms=round(statistics.median(steps) * 1000, 3) if steps else 0.0,
                sent_at=time.time(),
            )
        finally:  # on another thread: the caller waits for this stream's end
            record = self.accounting.submit(self._account, params, recorder, queue_s)
            record.add_done_callback(_log_failure)

    def _account(self, params: GenerationParams, recorder, queue_s: float) -> None:
        """The metrics of a finished request: its stages, queue time and steps."""
        for name, rec in recorder.stages.items():
            self.metrics.stage(*self.labels, name, rec.seconds, rec.vram_peak_bytes)
        self.metrics.stage(*self.labels, "queue", queue_s)
        self.metrics.steps(*self.labels, recorder.step_seconds, params.width, params.height)

    def _account_cancel(self, request_id, params, ended, token, step_seconds) -> None:
        total = params.num_inference_steps
        if isinstance(ended, Cancelled):
            stage, done = ended.stage, ended.steps_done
        else:  # it finished (or failed) before it saw the token
            stage, done = "done", total
        latency = None
        if token.signalled_at is not None and stage != "queued":
            latency = time.monotonic() - token.signalled_at
        self.metrics.cancelled(*self.labels, total - done, latency)
        self.record_cancel(
            request_id,
            {
                "stage": stage,
                "steps_done": done,
                "steps_total": total,
                "stop_latency_s": latency,
                "max_step_s": max(step_seconds, default=None),
            },
        )

    async def describe(self) -> dict:
        """On the event loop (async), which alone changes the adapter cache."""
        from serve_app.engine import family_module

        return {
            **super().describe(),
            "presets": self.presets_offered(),
            "default_preset": self.default_preset,
            "side_multiple": self.engine.side_multiple,
            "scheduler": family_module(self.family).SCHEDULER,
            "loras": self.adapters.describe(),
            "ready_s": round(self.ready_s, 3),
            "warmup_s": self.warmup_s,
            "startup_s": self.startup_s,
            "compile_cache": self.compile_cache,
            "memory": {
                "budget_bytes": self.memory.budget_bytes,
                "resident_bytes": self.memory.idle_bytes + self.adapters.cache.nbytes,
                "guidance_above": family_module(self.family).GUIDANCE_ABOVE,
                "ooms_in_a_row": self.ooms_in_a_row,
            },
        }
