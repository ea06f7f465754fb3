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
        loras: style adapters to apply, each with its scale.
        partial_images: previews of the first image to stream while drawing (0-3).
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    loras: tuple["LoraChoice", ...] = ()
    partial_images: int = 0


@dataclass(frozen=True)
class LoraChoice:
    """One adapter of a request.

    Args:
        name: the adapter file's name without ".safetensors", in the model's LoRA folder.
        scale: how strongly it applies, 0 (not at all) to 2.
    """

    name: str
    scale: float


@dataclass
class EncodedPrompt:
    """The encoder's answer: named embeddings as raw bits (bfloat16 has no numpy dtype;
    see serve_app/engine/embeddings.py). Which names, the family decides.

    Args:
        tensors: name -> array holding the bits of a tensor.
        dtypes: name -> the torch dtype name of those bits, e.g. "bfloat16".
        timings_ms: {"encode": ms}.
        vram: {"encode": peak bytes}.
    """

    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
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
class Preview:
    """Streamed by the denoiser: a cheap look at the first image mid-way.

    Args:
        index: 0, 1, 2 in order.
        steps_done: the steps it shows.
        pixels: HxWx3 uint8 at the latents' resolution (an eighth of the image's sides).
    """

    index: int
    steps_done: int
    pixels: np.ndarray


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
