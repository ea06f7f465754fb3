"""Merged adapters: a request's adapters added into the model's own weights.

A merged adapter costs a step nothing: the step is the base model's, on the base
model's graphs (on an H200, SDXL's 1024x1024 step took 37.3 ms merged, 48.3 ms
hot-swapped and 37.3 ms without an adapter, *sdxl-4*). What it costs is a switch: a
request whose adapters or scales differ from what the weights hold puts the original
weights back from a host copy and merges its own. Requests routed by adapter (model
multiplexing) keep finding theirs merged and pay nothing.

Every merge starts from the original weights, so a request's image never depends on
the requests before it: the same request gives the same pixels, whatever ran between.
The host copy of the adapted layers' weights (pinned on a GPU, for fast copies back)
is what this costs in memory: the bytes of those weights, in the host's RAM, not the
card's.
"""

import logging
import re
import weakref

import torch

from serve_app.engine.lora.files import Adapter, misfit

logger = logging.getLogger("ray.serve")


class FusedLora:
    """The linear layers of `model` that `targets` matches, with a request's adapters
    merged into their weights.

    Args:
        model: the denoiser's transformer or UNet (a diffusers model).
        targets: regular expression of the module names adapters may cover (full match).
        most: how many adapters one request may combine.
        max_rank: the largest adapter rank accepted.
    """

    # No slot runs: every request uses the base model's graphs, which read the weights
    # in place (see Denoiser.graphed).
    enabled = False

    def __init__(self, model: torch.nn.Module, targets: str, most: int, max_rank: int):
        pattern = re.compile(targets)
        self.layers: dict[str, torch.nn.Linear] = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)
        }
        if not self.layers:
            raise ValueError(f"no linear layer of the model matches {targets!r}")
        self.most, self.max_rank = most, max_rank
        self._original: dict[str, torch.Tensor] = {}
        # What the weights hold now: (adapter, scale) by weak reference, so that an
        # evicted adapter's device weights are freed; and the layers it changed.
        self._merged: list[tuple[weakref.ref, float]] = []
        self._changed: set[str] = set()
        self.host_bytes = 0

    @property
    def warmup_states(self) -> list[list[tuple[Adapter, float]]]:
        """The warm-up's adapter states: the base model's graphs serve every request."""
        return [[]]

    def to(self, device: torch.device) -> None:
        """Keep a host copy of the adapted layers' weights as they are now: call it once
        the model is on `device` in the dtype it serves in. Pinned where the device is
        CUDA (copies back at the bus's speed), unless the host cannot pin that much."""
        pin = device.type == "cuda"
        for name, layer in self.layers.items():
            weight = layer.weight.detach()
            try:
                copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=pin)
            except RuntimeError:  # pinned memory is bounded by the host; pageable works
                logger.warning("no pinned host memory for the adapters' copy; using pageable")
                pin = False
                copy = torch.empty(weight.shape, dtype=weight.dtype)
            self._original[name] = copy.copy_(weight)
        self.host_bytes = sum(t.numel() * t.element_size() for t in self._original.values())

    def misfit(self, module: str, a_shape: tuple, b_shape: tuple) -> str | None:
        """Why an adapter's (lora_A, lora_B) for `module` cannot be merged, or None."""
        return misfit(self.layers.get(module), module, a_shape, b_shape, self.max_rank)

    @torch.no_grad()
    def activate(self, choices: list[tuple[Adapter, float]]) -> None:
        """Make the weights hold `choices` (adapter, scale) merged, and nothing else; a
        scale of 0 counts as no adapter. Does nothing when they already do."""
        if len(choices) > self.most:
            raise ValueError(f"{len(choices)} adapters where {self.most} may be combined")
        wanted = [(adapter, scale) for adapter, scale in choices if scale != 0.0]
        if self._holds(wanted):
            return
        self._restore()
        try:
            self._merge(wanted)
        except BaseException:  # e.g. out of memory: never leave a half-merged model
            self._restore()
            raise
        self._merged = [(weakref.ref(adapter), scale) for adapter, scale in wanted]

    def _holds(self, wanted: list[tuple[Adapter, float]]) -> bool:
        return len(wanted) == len(self._merged) and all(
            ref() is adapter and held == scale
            for (ref, held), (adapter, scale) in zip(self._merged, wanted, strict=True)
        )

    def _restore(self) -> None:
        for name in self._changed:
            self.layers[name].weight.copy_(self._original[name], non_blocking=True)
        self._changed.clear()
        self._merged = []

    def _merge(self, wanted: list[tuple[Adapter, float]]) -> None:
        # Summed in float32 and rounded once into the weights' dtype: the result depends
        # on the adapters and scales alone.
        modules = sorted({m for adapter, _ in wanted for m in adapter.modules})
        for name in modules:
            weight = self.layers[name].weight
            self._changed.add(name)  # first: a failure below is undone by a restore
            total = weight.float()
            for adapter, scale in wanted:
                if name in adapter.modules:
                    a, b, factor = adapter.modules[name]
                    total.addmm_(b.float(), a.float(), alpha=factor * scale)
            weight.copy_(total)
