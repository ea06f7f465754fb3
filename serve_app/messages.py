"""What crosses between the ingress and the model replicas: plain Python and numpy only,
so the ingress (CPU, autoscaled) never imports torch."""

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GenerationParams:
    """Validated settings of one generation call.

    Args:
        prompt: the text to draw.
        negative_prompt: text to steer away from; used only when guidance_scale > 0.
        width: image width in pixels.
        height: image height in pixels.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance weight; 0 turns guidance off.
        seed: seed of the initial noise; the same seed gives the same image.
        num_images: images drawn from this prompt in one call.
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0


@dataclass
class EncodedPrompt:
    """The encoder's answer: embeddings as raw bits (bfloat16 has no numpy dtype).

    Args:
        prompt: [tokens, hidden] array holding the bits of a `dtype` tensor.
        negative: the same for the negative prompt, or None without guidance.
        dtype: the torch dtype name of the bits, e.g. "bfloat16".
        timings_ms: {"encode": ms}.
        vram: {"encode": peak bytes}.
    """

    prompt: np.ndarray
    negative: np.ndarray | None
    dtype: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    vram: dict[str, int] = field(default_factory=dict)


@dataclass
class Progress:
    """Streamed by the denoiser while it works.

    Args:
        stage: "denoise" (step `steps_done` of `steps_total` finished) or "decode".
        steps_done: steps finished so far.
        steps_total: steps the request asked for.
    """

    stage: str
    steps_done: int
    steps_total: int


@dataclass
class Generated:
    """The denoiser's last message: the images and what they cost.

    Args:
        images: HxWx3 uint8 arrays.
        timings_ms: per stage ("queue", "denoise", "decode").
        vram: peak device bytes per stage ("denoise", "decode").
        step_ms: median denoising step time.
        sent_at: time.time() when the denoiser sent this message (for the transfer
            time); 0 from a denoiser that does not say.
    """

    images: list[np.ndarray]
    timings_ms: dict[str, float]
    vram: dict[str, int]
    step_ms: float
    sent_at: float = 0.0
