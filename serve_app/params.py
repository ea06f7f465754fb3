"""What one generation asks for, after the HTTP edge has validated it and applied a preset."""

from dataclasses import dataclass


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
