"""The PromptEncoder replica: prompt -> embeddings, on a fraction of a GPU."""

import asyncio
import logging
import time

from ray import serve

from serve_app.config import ModelSettings
from serve_app.deployments.memory import cap_memory
from serve_app.deployments.replica import Replica
from serve_app.errors import Cancelled, DoesNotFit
from serve_app.messages import EncodedPrompt, GenerationParams

logger = logging.getLogger("ray.serve")


@serve.deployment
class PromptEncoder(Replica):
    """One model's text encoder(s); `num_gpus` and replicas in deploy/*.yaml under
    `PromptEncoder-<model id>`."""

    def __init__(self, settings: ModelSettings):
        from serve_app.engine import load_encoder  # torch is imported by model replicas only

        started = time.monotonic()
        cap_memory(settings, encoder=True)
        # Not compiled: on an H200 that cut a 65-token Z-Image encode from 31 to 12 ms
        # (results/*-levers-2.json) but took 234 s of start-up (*-bench-0.json).
        engine = load_encoder(
            settings.model, settings.device, settings.dtype, settings.encoder_precision
        )
        super().__init__(engine, settings)
        self.precision = settings.encoder_precision
        self.warmup_s = self.engine.warmup()
        self.ready_s = time.monotonic() - started
        logger.info(
            "PromptEncoder %s ready in %.1f s (warm-up %.1f s)",
            self.model_id,
            self.ready_s,
            self.warmup_s,
        )

    async def encode(self, request_id: str, params: GenerationParams) -> EncodedPrompt:
        from serve_app.engine.cancel import CancelToken
        from serve_app.engine.embeddings import to_arrays
        from serve_app.engine.stages import StageRecorder

        token, recorder = CancelToken(), StageRecorder(self.engine.device)

        def job():
            import torch

            try:
                with recorder.stage("encode"):
                    return self.engine.encode_params(params, cancel=token)
            except torch.OutOfMemoryError:
                pass
            # Raised outside the except block, whose traceback holds the activations.
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DoesNotFit(params.width, params.height, params.num_images, "encode")

        fut = self.worker.submit(job)
        self.metrics.queue_depth.set(self.worker.waiting)
        try:
            tensors = await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            ended = await self.worker.stop(fut, token)
            queued = isinstance(ended, Cancelled) and ended.stage == "queued"
            self.record_cancel(request_id, {"stage": "queued" if queued else "encode"})
            raise
        except DoesNotFit as exc:
            self.ran_out_of_memory(request_id, exc)
            raise
        finally:
            self.metrics.queue_depth.set(self.worker.waiting)
        self.ooms_in_a_row = 0
        rec = recorder.stages["encode"]
        self.metrics.stage(*self.labels, "encode", rec.seconds, rec.vram_peak_bytes)
        arrays, dtypes = to_arrays(tensors)
        return EncodedPrompt(arrays, dtypes, recorder.timings_ms(), recorder.vram_peaks())

    def describe(self) -> dict:
        return {
            **super().describe(),
            "max_prompt_tokens": self.engine.max_tokens,
            "precision": self.precision,
            "ready_s": round(self.ready_s, 3),
            "warmup_s": self.warmup_s,
        }
