"""SDXL: CLIP-L + OpenCLIP-bigG text encoders -> UNet2DConditionModel loop with an
EulerAncestral scheduler and classifier-free guidance -> 4-channel VAE.

The encoder and the denoiser are separate objects because they run in separate replicas.
"""

from serve_app.engine.sdxl.denoiser import (
    DEFAULT_PRESET,
    LORA,
    PRESETS,
    Options,
    SDXLDenoiser,
)
from serve_app.engine.sdxl.encoder import GUIDANCE_ABOVE, SDXLEncoder, uses_guidance

Encoder, Denoiser = SDXLEncoder, SDXLDenoiser
SCHEDULER = "EulerAncestralDiscreteScheduler"

__all__ = [
    "DEFAULT_PRESET",
    "GUIDANCE_ABOVE",
    "LORA",
    "PRESETS",
    "SCHEDULER",
    "Denoiser",
    "Encoder",
    "Options",
    "SDXLDenoiser",
    "SDXLEncoder",
    "uses_guidance",
]
