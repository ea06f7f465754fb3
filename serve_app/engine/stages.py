"""Per-request stage accounting: wall time and peak device memory of each stage."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from serve_app.errors import Cancelled


@dataclass
class StageRecord:
    """What one stage cost.

    Args:
        seconds: wall time, device work included (the device is synchronised at the end).
        vram_peak_bytes: the most device memory allocated during the stage (0 on CPU).
        outcome: "ok", "cancelled" or "error".
    """

    seconds: float
    vram_peak_bytes: int
    outcome: str


@dataclass
class StageRecorder:
    """Records stages of one request on one device.

    Use one recorder per request. A stage that raises is still recorded, with the
    outcome "cancelled" or "error", and the exception propagates.
    """

    device: torch.device
    stages: dict[str, StageRecord] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            peak = 0
            if self._cuda:
                try:
                    torch.cuda.synchronize(self.device)
                    peak = torch.cuda.max_memory_allocated(self.device)
                except RuntimeError:  # a broken context must not hide the original error
                    pass
            self.stages[name] = StageRecord(time.perf_counter() - start, peak, outcome)

    def step(self) -> "StepTimer":
        """Times one denoising step; the step's device work is finished when it exits."""
        return StepTimer(self)

    def timings_ms(self) -> dict[str, float]:
        return {name: round(rec.seconds * 1000, 3) for name, rec in self.stages.items()}

    def vram_peaks(self) -> dict[str, int]:
        return {name: rec.vram_peak_bytes for name, rec in self.stages.items()}


class StepTimer:
    """Context manager for one step: synchronises the device so that a step boundary is
    real. That bounds the work a cancel can leave queued on the device to one step."""

    def __init__(self, recorder: StageRecorder):
        self._recorder = recorder

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._recorder._cuda:
                torch.cuda.synchronize(self._recorder.device)
            self._recorder.step_seconds.append(time.perf_counter() - self._start)
