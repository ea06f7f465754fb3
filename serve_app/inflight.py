"""Which requests are in flight, so that a cancel sent to any ingress replica finds its
request on whichever replica runs it.

The ingress that owns a request `open`s it, then keeps one `watch` call pending for the
request's life. POST /v1/requests/{id}/cancel, on any ingress replica, calls `cancel`:
that ends the owner's `watch`, the owner cancels its work and reports where it stopped
with `stopped`, and `cancel` returns that report.
"""

import asyncio
import time
from dataclasses import dataclass, field

from ray import serve

# A record whose owner vanished without closing it (replica crash) is dropped after this.
STALE_AFTER_S = 3600.0


class DuplicateRequestId(Exception):
    """Another request with this id is in flight."""

    def __init__(self, request_id: str):
        super().__init__(request_id)
        self.request_id = request_id

    def __str__(self) -> str:
        return (
            f"a request with id '{self.request_id}' is already in flight; "
            "send a unique X-Request-Id"
        )


@dataclass
class _Record:
    opened: float = field(default_factory=time.monotonic)
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@serve.deployment
class InFlight:
    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    async def open(self, request_id: str) -> bool:
        """Register a request; False if a request with this id is in flight already."""
        now = time.monotonic()
        for rid in [r for r, rec in self._records.items() if now - rec.opened > STALE_AFTER_S]:
            self._records.pop(rid, None)
        if request_id in self._records:
            return False
        self._records[request_id] = _Record()
        return True

    async def watch(self, request_id: str) -> bool:
        """Return True when a cancel is requested (False at once for an unknown id). The
        owner cancels this call when its request ends."""
        rec = self._records.get(request_id)
        if rec is None:
            return False
        await rec.cancel_requested.wait()
        return True

    async def cancel(self, request_id: str, wait_s: float) -> dict | None:
        """Ask the owner of `request_id` to stop it and return its report of where it
        stopped; None if no such request is in flight or it finished first. Waits up to
        `wait_s` for the report."""
        rec = self._records.get(request_id)
        if rec is None:
            return None
        rec.cancel_requested.set()
        try:
            return await asyncio.wait_for(asyncio.shield(rec.stopped), wait_s)
        except TimeoutError:
            return {"stage": "unknown", "note": f"no stop report within {wait_s} s"}

    async def close(self, request_id: str, report: dict | None) -> None:
        """The owner's last word on a request: where it stopped if it was cancelled, None
        if it ended otherwise. A waiting `cancel` gets `report`."""
        rec = self._records.pop(request_id, None)
        if rec is not None and not rec.stopped.done():
            rec.stopped.set_result(report)
