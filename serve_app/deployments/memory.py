"""A Denoiser replica's device memory as admission sees it (serve_app/vram.py predicts
a request's need against it): what the replica holds idle and what a request may bring
it up to, measured once its warm-up is done."""

from dataclasses import dataclass

from serve_app.config import MemorySettings, ModelSettings


def cap_memory(settings: ModelSettings, encoder: bool = False) -> int | None:
    """Cap this process's share of its GPU, before anything loads: a Denoiser's at
    `memory.fraction` or `memory.cap_bytes`, a PromptEncoder's (`encoder`) at
    `memory.encoder_cap_bytes`. The same cap holds on every card the process sees: a
    replica given two (a Z-Image Denoiser with split guidance keeps its transformer's
    second copy on its second card) is held to it on both. Returns the cap in bytes;
    None for none, or on a CPU."""
    memory = settings.memory
    if encoder:
        fraction, cap = None, memory.encoder_cap_bytes
    else:
        fraction, cap = memory.fraction, memory.cap_bytes
    if fraction is None and cap is None:
        return None
    from serve_app.engine import pick_device

    device = pick_device(settings.device)
    if device.type != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    cards = [index, *(i for i in range(torch.cuda.device_count()) if i != index)]
    totals = {i: torch.cuda.get_device_properties(i).total_memory for i in cards}
    cap = cap or int(totals[index] * fraction)
    for i, total in totals.items():
        if cap > total:
            raise ValueError(
                f"model {settings.id!r}: a memory cap of {cap / 2**30:.1f} GiB is more "
                f"than card {i}'s {total / 2**30:.1f} GiB"
            )
    for i, total in totals.items():
        torch.cuda.set_per_process_memory_fraction(cap / total, i)
    return cap


@dataclass(frozen=True)
class ReplicaMemory:
    """idle_bytes: held with no request running and no adapter cached (weights, the
    CUDA graphs' pool); budget_bytes: what a request may bring the replica up to, None
    for no budget (a CPU without `memory.budget_bytes`)."""

    idle_bytes: int
    budget_bytes: int | None

    @classmethod
    def measure(
        cls,
        engine,
        settings: MemorySettings,
        weights_bytes: int,
        adapter_bytes: int,
        cap_bytes: int | None,
    ) -> "ReplicaMemory":
        """After the warm-up: `weights_bytes` count on a CPU (where nothing else is),
        the allocator's figures on a GPU; `adapter_bytes` (cached adapters) are left out
        of idle_bytes, since the cache grows and shrinks; `cap_bytes`: the process's
        cap (see cap_memory), None for none."""
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
            free = torch.cuda.mem_get_info(device)[0]
            # Its cap, or what it holds now and no other process does.
            held = cap_bytes if cap_bytes is not None else reserved + free
            budget = int(held - settings.reserve_bytes)
        return cls(allocated - adapter_bytes + pool, budget)
