"""Z-Image: Qwen3 text encoder -> ZImageTransformer2DModel loop -> 16-channel VAE.

The encoder and the denoiser are separate objects because they run in separate replicas
(a fraction of a GPU for the encoder, a whole one for the denoiser).
"""

from serve_app.engine.zimage.denoiser import (
    DEFAULT_PRESET,
    LORA,
    PRESETS,
    Options,
    ZImageDenoiser,
)
from serve_app.engine.zimage.encoder import GUIDANCE_ABOVE, ZImageEncoder, uses_guidance

Encoder, Denoiser = ZImageEncoder, ZImageDenoiser
SCHEDULER = "FlowMatchEulerDiscreteScheduler"

__all__ = [
    "DEFAULT_PRESET",
    "GUIDANCE_ABOVE",
    "LORA",
    "PRESETS",
    "SCHEDULER",
    "Denoiser",
    "Encoder",
    "Options",
    "ZImageDenoiser",
    "ZImageEncoder",
    "uses_guidance",
]
