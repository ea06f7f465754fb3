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
import os
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


# On a CPU the device work shares the cores with the event loops of every replica, the
# ingress and Ray's proxy, where a GPU would not: it yields the cores to them (Linux,
# per thread). Ray already runs every worker at niceness 15, so a niceness would leave
# the loops little ahead (15 against 19: 36 to 15 in CFS weights; measured: no change to
# the refusal times under 10x overload); SCHED_IDLE runs it only on cores they leave.
def _yield_to_the_event_loops() -> None:
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class DeviceWorker:
    """One thread that runs a replica's device work, one job at a time, in arrival order.

    Args:
        on_cpu: the work runs on the CPU (its thread then yields to the event loops).
    """

    def __init__(self, on_cpu: bool = False) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix="device",
            initializer=_yield_to_the_event_loops if on_cpu else None,
        )
        self._lock = threading.Lock()
        self._waiting = self._jobs = 0

    @property
    def waiting(self) -> int:
        """Jobs submitted and not started yet."""
        return self._waiting

    @property
    def idle(self) -> bool:
        """No job running or waiting."""
        return self._jobs == 0

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        def start():
            self._add(-1)
            return fn()

        self._add(1, 1)
        fut = self._pool.submit(start)
        fut.add_done_callback(lambda f: self._add(-1 if f.cancelled() else 0, -1))
        return fut

    def _add(self, waiting: int, jobs: int = 0) -> None:
        with self._lock:
            self._waiting += waiting
            self._jobs += jobs

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
        self.unhealthy_after_ooms = settings.memory.unhealthy_after_ooms
        self.ooms_in_a_row = 0
        self.worker = DeviceWorker(on_cpu=engine.device.type == "cpu")
        self.metrics = Metrics()
        self.cancellations: OrderedDict[str, dict] = OrderedDict()
        from serve_app.engine.precision import weights_bytes

        self.weights_bytes = weights_bytes(engine.modules)
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

    def ran_out_of_memory(self, request_id: str, exc: BaseException) -> None:
        """Count an out-of-memory failure (the engine has freed what the request took)."""
        self.ooms_in_a_row += 1
        self.metrics.out_of_memory(*self.labels)
        logger.warning(
            "request %s: %s (%d in a row; unhealthy at %d)",
            request_id,
            exc,
            self.ooms_in_a_row,
            self.unhealthy_after_ooms,
        )

    def check_health(self) -> None:
        """Ray's health check: fails (and Ray replaces this replica) after
        `memory.unhealthy_after_ooms` out-of-memory failures in a row, or when the idle
        device cannot allocate 1 MiB."""
        if self.ooms_in_a_row >= self.unhealthy_after_ooms:
            raise RuntimeError(f"{self.ooms_in_a_row} requests in a row ran out of device memory")
        device = self.engine.device
        if device.type == "cuda" and self.worker.idle:
            import torch

            torch.empty(2**20, dtype=torch.uint8, device=device)

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
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": gpu_ids(),
            "queue_depth": self.worker.waiting,
            "vram": vram(self.engine.device, self.weights_bytes),
        }
