"""Process-wide torch.compile settings shared by the families' compiled regions, and the
persistent cache that lets a restarted replica skip compilation."""

import os
from pathlib import Path

import torch

# Graphs one compiled code object may keep. All of Z-Image's transformer blocks share one
# forward (the main layers and both refiners, with and without modulation), compiled for
# batch 1 and 2, with and without an attention mask: 8 graphs after the warm-up, Dynamo's
# default limit, past which a `fullgraph=True` call fails. LoRA on and off doubles that.
RECOMPILE_LIMIT = 64


def configure_dynamo() -> None:
    """Process-wide Dynamo settings for our compiled regions; call before compiling.

    Duck sizing off: with it, a dimension that happens to equal another at compile time
    (a prompt padded to 64 tokens and the 64 rotary pairs of a head) shares its symbol,
    which the static one then pins; the next prompt length recompiles. An H200 run
    failed that way on its first guidance request after the warm-up had used all eight
    graphs; tests/engine/zimage/test_denoiser.py checks that no request recompiles.

    Inductor's deterministic mode: no kernel configuration picked by timing it on the
    device where the choice changes the numerics (a reduction's block sizes change its
    order of summation). Without it a restarted H100 replica, which loaded every graph
    from the compile cache, drew seed 0 differently from the start that compiled them
    (max 6 levels, PSNR 48.5 dB; *perf-7*), while each start repeated its own image
    exactly. With it the restart was identical in *perf-8*, but 6 levels apart again on
    another H100 (*perf-11*): another difference between the two processes remains.
    """
    torch.fx.experimental._config.use_duck_shape = False
    torch._inductor.config.deterministic = True
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation of a diffusers model's repeated blocks, with dynamic shapes:
    one compilation serves every size, prompt length and batch; the first calls compile.
    Every copy of a model is compiled through here, so that all compile alike."""
    configure_dynamo()
    model.compile_repeated_blocks(fullgraph=True, dynamic=True)


def use_compile_cache(folder: Path) -> None:
    """Keep this process's compilation caches in `folder`: inductor's compiled graphs,
    AOTAutograd's, and Triton's kernels with their autotuning, all of which inductor
    keeps under TORCHINDUCTOR_CACHE_DIR. A replica that starts again with the same
    folder, torch and device loads what an earlier start compiled instead of compiling
    it; Dynamo still traces each region (seconds, not minutes). Its default is a folder
    under /tmp, which a new container or node does not have. Call before compiling."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def compile_cache_stats() -> dict[str, int]:
    """This process's graphs inductor loaded from the cache and those it compiled, so
    far (a warm start loads every graph its warm-up needs)."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"loaded": inductor["fxgraph_cache_hit"], "compiled": inductor["fxgraph_cache_miss"]}
