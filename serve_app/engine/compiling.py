"""Process-wide torch.compile settings shared by the families' compiled regions."""

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
    """
    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
