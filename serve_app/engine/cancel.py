"""A per-request cancel flag that the step loop checks between steps."""

import threading
import time

from serve_app.errors import Cancelled


class CancelToken:
    """Set from any thread; checked by the engine at stage and step boundaries.

    One token belongs to one request, so cancelling it never touches another request
    (unlike a diffusers pipeline's shared `_interrupt`).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signalled_at: float | None = None  # time.monotonic() of the first cancel()

    def cancel(self) -> None:
        if not self._event.is_set():
            self.signalled_at = time.monotonic()
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, stage: str, steps_done: int = 0, steps_total: int = 0) -> None:
        """Raise `Cancelled` if the request was cancelled; otherwise return at once."""
        if self._event.is_set():
            raise Cancelled(stage, steps_done, steps_total)
