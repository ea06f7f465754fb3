"""Which requests are in flight, over the whole service: so that a cancel sent to any
ingress replica finds its request on whichever replica runs it, and so that what the
service takes in is bounded however many ingress replicas there are.

The ingress that owns a request `open`s it before any work (admission), then keeps one
`watch` call pending for the request's life. POST /v1/requests/{id}/cancel, on any
ingress replica, calls `cancel`: that ends the owner's `watch`, the owner cancels its
work and reports where it stopped with `close`, and `cancel` returns that report.

Admission: a model takes `requests_per_replica` requests per running Denoiser replica
(Ray Serve's own queue limit, max_queued_requests, counts per caller: with N ingress
replicas a replica's queue could grow to N times it), and one API key at most its
`max_in_flight`. Past either: a refusal with the time a retry is likely to be taken.
"""

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import ray
from ray import serve

# How often the running replicas of each model are asked of Serve's controller, and how
# often the live ones of Ray's actor table. The controller's answer is exact but dear
# (serve.status(): ~100 ms of this process's CPU, measured on the dev machine, while the
# GIL slows the event loop every admission waits on); the actor table costs ~0.3 ms and
# shows a replica that died at once, but counts one still starting too. Their minimum:
# a new replica counts within RUNNING_REFRESH_S of being ready, a dead one within
# LIVE_REFRESH_S.
RUNNING_REFRESH_S = 15.0
LIVE_REFRESH_S = 1.0
# Weight of the newest request in the running mean of request times (Retry-After).
MEAN_WEIGHT = 0.2
MAX_RETRY_AFTER_S = 60


def replica_prefix(app: str, deployment: str) -> str:
    """The start of the names Serve gives a deployment's replica actors (namespace
    "serve"): SERVE_REPLICA::<app>#<deployment>#<replica id>."""
    return f"SERVE_REPLICA::{app}#{deployment}#"


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


@dataclass(frozen=True)
class ModelLimit:
    """Args:
    denoiser: the model's Denoiser deployment name.
    requests_per_replica: requests taken in per running Denoiser replica.
    """

    denoiser: str
    requests_per_replica: int


@dataclass
class _Record:
    model: str | None
    key: str | None
    owner: str | None
    opened: float = field(default_factory=time.monotonic)
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@serve.deployment
class InFlight:
    """Args:
    limits: model id -> its admission limit.
    stale_after_s: a record whose owner vanished without closing it (an ingress replica
        that died) is dropped after this: above the longest request allowed.
    """

    def __init__(self, limits: dict[str, ModelLimit], stale_after_s: float) -> None:
        self._records: dict[str, _Record] = {}
        self._limits, self._stale_after_s = limits, stale_after_s
        self._running_replicas: dict[str, int] = {}
        self._live_replicas: dict[str, int] = {}
        self._running_at = self._live_at = -math.inf
        self._mean_s: dict[str, float] = {}

    async def open(
        self,
        request_id: str,
        model: str | None = None,
        key: str | None = None,
        key_limit: int | None = None,
        owner: str | None = None,
    ) -> dict | None:
        """Register a request, or refuse it: None when taken, else {"reason":
        "duplicate"} (a request with this id is in flight), {"reason": "queue", "limit",
        "retry_after_s"} or {"reason": "key_limit", "limit", "retry_after_s"}. `owner`:
        who may close the record (see close)."""
        now = time.monotonic()
        for rid in [
            r for r, rec in self._records.items() if now - rec.opened > self._stale_after_s
        ]:
            self._records.pop(rid, None)
        if request_id in self._records:
            return {"reason": "duplicate"}
        if key is not None and key_limit is not None:
            held = sum(rec.key == key for rec in self._records.values())
            if held >= key_limit:
                return {"reason": "key_limit", "limit": key_limit, "retry_after_s": 1}
        if model in self._limits:
            replicas = await self._running(model)
            limit = replicas * self._limits[model].requests_per_replica
            held = sum(rec.model == model for rec in self._records.values())
            if held >= limit:
                # The requests ahead share the replicas; one more must end first.
                ahead = (held - limit + 1) / replicas
                wait = math.ceil(self._mean_s.get(model, 1.0) * ahead)
                retry = min(max(wait, 1), MAX_RETRY_AFTER_S)
                return {"reason": "queue", "limit": limit, "retry_after_s": retry}
        self._records[request_id] = _Record(model, key, owner)
        return None

    async def _running(self, model: str) -> int:
        """Running Denoiser replicas of `model` (at least 1: while none runs, requests
        wait for the first as Serve's router makes them). On a failure to ask, the last
        count stays: the controller is back soon."""
        now = time.monotonic()
        if now - self._running_at > RUNNING_REFRESH_S:
            self._running_at = now
            with contextlib.suppress(Exception):
                self._running_replicas = await asyncio.to_thread(self._ask_running)
        self._refresh_live()
        running = self._running_replicas.get(model, 1)
        return max(min(running, self._live_replicas.get(model, running)), 1)

    def idle(self) -> list[str]:
        """Models with no Denoiser replica alive or starting: scaled to zero (or every
        replica died and Ray has not started another yet). Calling such a model's
        replicas starts one, which the caller may not want (a readiness probe)."""
        self._refresh_live()
        return [model for model in self._limits if self._live_replicas.get(model, 1) == 0]

    def _refresh_live(self) -> None:
        now = time.monotonic()
        if now - self._live_at > LIVE_REFRESH_S:
            self._live_at = now
            with contextlib.suppress(Exception):
                self._live_replicas = self._ask_live()

    def _ask_running(self) -> dict[str, int]:
        app = serve.get_replica_context().app_name
        deployments = serve.status().applications[app].deployments
        return {
            model: deployments[limit.denoiser].replica_states.get("RUNNING", 0)
            for model, limit in self._limits.items()
            if limit.denoiser in deployments
        }

    def _ask_live(self) -> dict[str, int]:
        """Replica actors alive or starting, by model."""
        app = serve.get_replica_context().app_name
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return {
            model: sum(n.startswith(replica_prefix(app, limit.denoiser)) for n in names)
            for model, limit in self._limits.items()
        }

    def held(self) -> dict[str, dict[str, int]]:
        """Requests in flight now: {"models": {model: n}, "keys": {key: n}}."""
        models, keys = Counter(), Counter()
        for rec in self._records.values():
            models[rec.model] += rec.model is not None
            keys[rec.key] += rec.key is not None
        return {"models": +models, "keys": +keys}

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

    async def close(self, request_id: str, report: dict | None, owner: str | None = None) -> None:
        """The owner's last word on a request: where it stopped if it was cancelled, None
        if it ended otherwise. A waiting `cancel` gets `report`. A record opened with an
        owner is closed by that owner only (a duplicate id's caller cannot close it)."""
        rec = self._records.get(request_id)
        if rec is None or rec.owner != owner:
            return
        del self._records[request_id]
        if report is None and rec.model is not None:  # it ran to its end
            took = time.monotonic() - rec.opened
            mean = self._mean_s.get(rec.model, took)
            self._mean_s[rec.model] = (1 - MEAN_WEIGHT) * mean + MEAN_WEIGHT * took
        if not rec.stopped.done():
            rec.stopped.set_result(report)
