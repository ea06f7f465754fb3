"""Readings taken in the background: a reading every few seconds on a thread while a
`with` block runs (the cards' memory in the benchmarks, the replicas' in the load
tests). No torch here: the load tests' runner does not import it."""

import threading
import time
from collections.abc import Callable


class Periodic:
    """Calls `read()` at once and then every `every_s` seconds, on a thread, from entering
    the `with` block to leaving it, and keeps (time.monotonic(), reading) pairs in
    `samples`. With `every_s` <= 0 it reads nothing."""

    def __init__(self, read: Callable[[], object], every_s: float):
        self._read, self.every_s = read, every_s
        self.samples: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._read()))
            self._stop.wait(self.every_s)

    def __enter__(self):
        if self.every_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
