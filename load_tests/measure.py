"""Measuring helpers shared by the GPU benchmarks: device facts, FLOP counts, timers."""

import gc
import io
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from load_tests.sampling import Periodic


def device_facts(device: torch.device) -> dict:
    import diffusers
    import transformers

    facts = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        facts["gpu"] = "cpu"
    return facts


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 matrix-product rate on random data (the card's practical ceiling)."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times) / 1e12


def transformer_flops(config, width: int, height: int, cap_tokens: int, batch: int) -> float:
    """FLOPs of one ZImageTransformer2DModel forward, counted from its config.

    Per block over a sequence of L tokens: the projections (q, k, v, out: 4*D*D) and the
    gated FFN (3*D*H with H = 8/3*D) cost 2*L*(4*D*D + 3*D*H); attention scores and
    values cost 4*L*L*D. The noise refiner sees the image tokens, the context refiner
    the caption tokens, the main layers both. Embedders and final layer are negligible.
    """
    d = config.dim
    hidden = int(d / 3 * 8)
    image = (height // 16) * (width // 16)
    image += -image % 32  # both are padded to multiples of 32
    caption = cap_tokens + (-cap_tokens % 32)

    def block(tokens: int) -> float:
        return 2 * tokens * (4 * d * d + 3 * d * hidden) + 4 * tokens * tokens * d

    per_item = config.n_refiner_layers * (block(image) + block(caption)) + config.n_layers * block(
        image + caption
    )
    return batch * per_item


class Timer:
    """Wall time of a region, device work included."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextmanager
    def __call__(self, into: list[float]):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        into.append(time.perf_counter() - start)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class ForwardTimes:
    """Device time of each forward of `module`, from CUDA events (or wall time on CPU),
    without synchronising between forwards: the caller's own pacing is measured."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.pairs, self._open = device, [], None
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, *_):
        self._open = self._mark()

    def _post(self, *_):
        self.pairs.append((self._open, self._mark()))

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1000 for a, b in self.pairs]
        return [b - a for a, b in self.pairs]

    def span(self) -> float:
        """From the first forward's start to the last one's end."""
        if not self.pairs:
            return 0.0
        first, last = self.pairs[0][0], self.pairs[-1][1]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return first.elapsed_time(last) / 1000
        return last - first

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def timed_method(
    obj, name: str, into: list[float], device: torch.device, before: Callable | None = None
) -> Callable[[], None]:
    """Time every call of obj.name (device synchronised), calling `before()` first if
    given; returns an undo function."""
    original = getattr(obj, name)
    timer = Timer(device)

    def wrapper(*args, **kwargs):
        if before is not None:
            before()
        with timer(into):
            return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, original)


def summary(values: list[float]) -> dict:
    """p50/p90/p99/min/max in milliseconds (p90, p99: nearest rank)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 2)

    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p90_ms": rank(0.9),
        "p99_ms": rank(0.99),
        "min_ms": round(ordered[0] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    """Give back what dropped objects held: collect them, then empty PyTorch's cache on a
    GPU, so that the next phase's figures start from what is really held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def png_pixels(png: bytes) -> np.ndarray:
    """An encoded image's pixels, HxWx3 uint8."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def image_difference(ours: np.ndarray, reference: np.ndarray) -> dict:
    """How far an HxWx3 uint8 image is from a reference: mean and max absolute
    difference in levels (0-255), and PSNR in dB (None where they are equal)."""
    diff = ours.astype(np.float64) - reference.astype(np.float64)
    mse = float((diff**2).mean())
    return {
        "mean_abs": round(float(np.abs(diff).mean()), 3),
        "max_abs": int(np.abs(diff).max()),
        "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None,
    }


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return 0


class CardMemory(Periodic):
    """The whole card's used memory, every process and CUDA context included, as
    nvidia-smi reports it, sampled on a thread while the block runs: the peak and the
    last reading (MiB). Zeros where there is no nvidia-smi (a CPU run)."""

    def __init__(self, device: torch.device, every_s: float = 0.2):
        self.device = device
        super().__init__(self.read, every_s)

    @property
    def peak_mib(self) -> int:
        return max((mib for _, mib in self.samples), default=0)

    @property
    def last_mib(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def read(self) -> int:
        if self.device.type != "cuda":
            return 0
        index = self.device.index or 0
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-i", str(index)],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return 0
        return int(out.strip().splitlines()[0])
