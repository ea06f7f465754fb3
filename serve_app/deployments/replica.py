"""What both model replicas share: the worker thread that runs their device work, the
per-replica gauges, and the records of where cancelled requests stopped.

Each replica runs its device work on one worker thread (one request at a time, in
arrival order, off the replica's event loop), turns Serve's cancellation of a call into
the engine's per-request CancelToken, and records metrics. No model math here.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import ray

from serve_app.config import ModelSettings
from serve_app.errors import Cancelled
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


def gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def vram(device, weights_bytes: int) -> dict[str, int]:
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


class Replica:
    """Worker thread, metrics, gauges and cancel records of one model's replica.

    Args:
        engine: the family's encoder or denoiser (with `device`, `family`, `modules`).
        settings: the model this replica serves.
    """

    def __init__(self, engine, settings: ModelSettings):
        self.engine = engine
        self.family, self.model_id = engine.family, settings.id
        self.worker = DeviceWorker()
        self.metrics = Metrics()
        self.cancellations: OrderedDict[str, dict] = OrderedDict()
        self.weights_bytes = sum(
            p.numel() * p.element_size() for m in engine.modules for p in m.parameters()
        )
        threading.Thread(target=self._refresh_gauges, daemon=True).start()

    @property
    def labels(self) -> tuple[str, str]:
        """(family, model) of every series this replica records."""
        return self.family, self.model_id

    def _refresh_gauges(self) -> None:
        """Refresh the per-replica gauges forever, requests or not (a daemon thread)."""
        while True:
            self.metrics.refresh(self.worker.waiting, vram(self.engine.device, self.weights_bytes))
            time.sleep(GAUGE_REFRESH_S)

    def record_cancel(self, request_id: str, record: dict) -> None:
        self.cancellations[request_id] = record
        while len(self.cancellations) > KEEP_CANCELLATIONS:
            self.cancellations.popitem(last=False)
        logger.info("request %s cancelled: %s", request_id, json.dumps(record))

    def cancellation(self, request_id: str) -> dict | None:
        """Where a recently cancelled request stopped on this replica: its stage and, for
        the denoiser, steps done and how long the loop took to stop after the signal.
        None if this replica has no record of it (the last 1000 are kept)."""
        return self.cancellations.get(request_id)

    def describe(self) -> dict:
        from ray import serve

        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "model": self.model_id,
            "family": self.family,
            "device": str(self.engine.device),
            "gpu_ids": gpu_ids(),
            "queue_depth": self.worker.waiting,
            "vram": vram(self.engine.device, self.weights_bytes),
        }
