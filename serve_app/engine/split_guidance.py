"""Classifier-free guidance split across two devices (issue 16): a guided step's
conditional pass runs on the denoiser's own device while its unconditional pass runs, at
the same time, on a second copy of the model on a second device. Nothing family-specific:
a family hands `SplitGuidance.run` its two passes as calls.

Each pass runs at batch 1 with its own caption, so neither needs the padding and attention
mask that one batch of two captions of different lengths does. The second pass is
launched from a worker thread: a step's host-side work (Python, kernel launches) is a
large share of it, and from one thread the second pass's launches would wait for the
first's.
"""

import concurrent.futures
import contextlib
from collections.abc import Callable

import torch

from serve_app.engine.compiling import compile_blocks


def second_device(device: torch.device) -> torch.device:
    """Where the second copy runs: on CUDA the other of the replica's two visible cards
    (cuda:1 for a replica on cuda:0; a Denoiser replica given `num_gpus: 2` sees its
    cards as cuda:0 and cuda:1); on the CPU the CPU, so that the whole path runs in tests.

    Raises:
        ValueError: fewer than two CUDA devices are visible, or the device is neither
            CUDA nor the CPU.
    """
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"split_guidance runs on CUDA or the CPU, not on {device.type}")
    visible = torch.cuda.device_count()
    if visible < 2:
        raise ValueError(
            f"split_guidance needs 2 CUDA devices visible to the Denoiser, {visible} are: "
            "give its replica ray_actor_options.num_gpus: 2, or set split_guidance: false"
        )
    first = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", 1 if first == 0 else 0)


class SplitGuidance:
    """The second copy of a model and the thread that runs its passes.

    Args:
        model: the second copy, loaded and prepared as the first (our changes, its
            precision); moved to `device` here.
        device: where it runs (see second_device).
        compile: compile it as the first (compiling.compile_blocks); its first calls
            compile, so the denoiser's warm-up must take this path.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, compile: bool):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        if compile:
            compile_blocks(self.model)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="split-cfg")

    def run(
        self,
        first: Callable[[], torch.Tensor],
        second: Callable[..., torch.Tensor],
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`first()` on this thread and `second(*inputs)` on the worker thread, at once.
        Returns both outputs, the second's copied to the first's device (queued there:
        the device waits for it, the host does not).

        `inputs` are copied to the second device here, before `first` queues anything: a
        copy between two CUDA devices waits for the work queued on both, so made after
        `first` it would wait for the whole first pass.
        """
        moved = [x.to(self.device) for x in inputs]
        grad = torch.is_grad_enabled()  # thread-local; compiled code is guarded on it

        def on_worker() -> torch.Tensor:
            on_device = (
                torch.cuda.device(self.device)
                if self.device.type == "cuda"
                else contextlib.nullcontext()
            )
            with torch.set_grad_enabled(grad), on_device:
                return second(*moved)

        future = self._worker.submit(on_worker)
        try:
            out = first()
        except BaseException:
            concurrent.futures.wait([future])  # nothing of the step left running
            raise
        return out, future.result().to(out.device)
