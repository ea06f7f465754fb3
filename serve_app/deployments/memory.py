"""A Denoiser replica's device memory as admission sees it (serve_app/vram.py predicts
a request's need against it): what the replica holds idle and what a request may bring
it up to, measured once its warm-up is done."""

from dataclasses import dataclass

from serve_app.config import MemorySettings, ModelSettings


def cap_memory(settings: ModelSettings) -> None:
    """Cap this process's share of its GPU at `memory.fraction`, before anything loads."""
    if settings.memory.fraction is None:
        return
    from serve_app.engine import pick_device

    device = pick_device(settings.device)
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(settings.memory.fraction, index)


@dataclass(frozen=True)
class ReplicaMemory:
    """idle_bytes: held with no request running and no adapter cached (weights, the
    CUDA graphs' pool); budget_bytes: what a request may bring the replica up to, None
    for no budget (a CPU without `memory.budget_bytes`)."""

    idle_bytes: int
    budget_bytes: int | None

    @classmethod
    def measure(
        cls, engine, settings: MemorySettings, weights_bytes: int, adapter_bytes: int
    ) -> "ReplicaMemory":
        """After the warm-up: `weights_bytes` count on a CPU (where nothing else is),
        the allocator's figures on a GPU; `adapter_bytes` (cached adapters) are left out
        of idle_bytes, since the cache grows and shrinks."""
        device = engine.device
        if device.type != "cuda":
            return cls(weights_bytes - adapter_bytes, settings.budget_bytes)
        import torch

        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        # The CUDA graphs' pool, beyond live tensors: their activations, reserved for
        # their replays (a capture empties the allocator's cache before it runs, so the
        # cache holds little else), memory no request outside the graphs can use.
        # Counted as held, a graphed request's own activations count twice: a refusal
        # on the safe side.
        pool = reserved - allocated if engine.graphs else 0
        budget = settings.budget_bytes
        if budget is None:
            free, total = torch.cuda.mem_get_info(device)
            # Its fraction of the card, or what it holds now and no other process does.
            held = total * settings.fraction if settings.fraction is not None else reserved + free
            budget = int(held - settings.reserve_bytes)
        return cls(allocated - adapter_bytes + pool, budget)
