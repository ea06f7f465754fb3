"""What this ingress replica last heard of each model being full, kept briefly.

Under overload most requests are refused, and asking InFlight for each costs a handle
call: CPU in this replica and in InFlight, and a wait on both event loops, on the path
of every refusal (load_tests/results/cpu-2026-12-05-refusal-levers.md). After
InFlight refuses a model for being full, the next requests for it are refused here, with
InFlight's answer, until a request of the model that this replica owned is closed (a
slot is free: the next request asks InFlight again) or `hold_s` passes (a slot freed
through another ingress replica is seen by then). It only ever refuses: what InFlight
takes in, and so the bound over the whole service, is unchanged.
"""

import time

from serve_app.errors import Busy


class FullModels:
    """Args:
    hold_s: how long a refusal stands without a word from InFlight.
    """

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self._full: dict[str, tuple[float, Busy]] = {}
        self._closed: dict[str, int] = {}

    def refusal(self, model: str) -> Busy | None:
        """InFlight's last refusal of `model`, if it still stands; else None (ask)."""
        known = self._full.get(model)
        if known is None:
            return None
        since, busy = known
        if time.monotonic() - since > self.hold_s:
            del self._full[model]
            return None
        return Busy(busy.reason, busy.limit, busy.retry_after_s)

    def closes(self, model: str) -> int:
        """How many of `model`'s requests this replica has closed: taken before asking
        InFlight, given back with its answer (see `refused`)."""
        return self._closed.get(model, 0)

    def refused(self, model: str, busy: Busy, closes: int) -> None:
        """InFlight refused `model` as full, asked when `closes` requests had closed. A
        request closed since may have freed a slot after InFlight answered: then the
        refusal is not kept."""
        if busy.reason == "queue" and self.closes(model) == closes:
            self._full[model] = (time.monotonic(), busy)

    def closed(self, model: str) -> None:
        """InFlight has closed one of `model`'s requests (a slot is free)."""
        self._closed[model] = self.closes(model) + 1
        self._full.pop(model, None)
