"""CUDA graphs of a model call, one per input shape, captured during a warm-up and
replayed for every request of a captured shape.

A model call that is bound by the host (each kernel launched from Python, compiled
regions checking their guards) costs the host's time, not the device's: replayed, the
whole call is one launch. All graphs of one object share one memory pool, so the
activations of each captured shape reuse the same blocks (graphs replay one at a time,
on one stream) and the pool is as large as the largest call's activations.
"""

from collections.abc import Callable, Hashable

import torch


class CudaGraphs:
    """Graphs of inference calls `fn(*tensors) -> tensor`, keyed by the caller.

    Args:
        device: the CUDA device the calls run on.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}
        self._pool = None
        self._side = None
        self.replays = 0  # calls served from a graph, for checks

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def capture(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        """Capture `fn` on copies of `inputs` (their shapes, dtypes and devices) as `key`.
        `fn` must not synchronise with the host or branch on tensor values; it runs
        twice first, per CUDA's recipe, on a side stream."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            # One side stream for every warm-up: cuBLAS keeps a workspace (32 MiB on
            # Hopper) per stream it has run on, for the life of the process.
            self._side = torch.cuda.Stream(self.device)
        static = [x.clone() for x in inputs]
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            for _ in range(2):
                fn(*static)
        current.wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a replica's metrics) do not void it.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn(*static)
        self._graphs[key] = (graph, static, out)

    def replay(self, key: Hashable, *inputs: torch.Tensor) -> torch.Tensor:
        """`fn(*inputs)` as captured under `key`. The result is the graph's own output
        tensor: the next replay of `key` overwrites it."""
        graph, static, out = self._graphs[key]
        for into, x in zip(static, inputs, strict=True):
            into.copy_(x)
        graph.replay()
        self.replays += 1
        return out
