"""Our SDXL encoder + loop against the stock diffusers StableDiffusionXLPipeline (with
the EulerAncestral scheduler the tiny checkpoint carries), float32 on CPU."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from serve_app.messages import GenerationParams


@pytest.fixture(scope="module")
def pipe(sdxl_path):
    # Loaded by diffusers' own loader from the same folder: the reference shares nothing
    # with our loading code. The tiny checkpoint's scheduler is EulerAncestral.
    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl_path, torch_dtype=torch.float32, add_watermarker=False
    )
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    return pipe


def count_calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


def stock(pipe, p: GenerationParams):
    calls, handle = count_calls(pipe.unet)
    try:
        images = pipe(
            p.prompt,
            negative_prompt=p.negative_prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            num_images_per_prompt=p.num_images,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            output_type="np",
        ).images
    finally:
        handle.remove()
    return (images * 255).round().astype("uint8"), len(calls)


def ours(encoder, denoiser, p: GenerationParams):
    calls, handle = count_calls(denoiser.unet)
    try:
        images = np.stack(denoiser.generate(p, encoder.encode_params(p)))
    finally:
        handle.remove()
    return images, len(calls)


CASES = {
    # The report's preset at a small size: CFG 7, zeros for the missing negative prompt.
    "cfg-7-no-negative": GenerationParams("a red fox in the snow", None, 256, 256, 5, 7.0, 42),
    "cfg-negative-2-images": GenerationParams(
        "a lighthouse in a storm", "blurry, low quality", 256, 320, 4, 5.0, 7, num_images=2
    ),
    # guidance_scale <= 1: no guidance, one UNet batch of the prompt alone.
    "no-guidance": GenerationParams("ramen, top view", None, 320, 256, 3, 1.0, 2**40),
}


@pytest.mark.parametrize("name", CASES)
def test_same_pixels_and_calls_as_stock_pipeline(name, pipe, sdxl_encoder, sdxl_denoiser):
    p = CASES[name]
    ref, ref_calls = stock(pipe, p)
    got, got_calls = ours(sdxl_encoder, sdxl_denoiser, p)
    assert got.shape == ref.shape == (p.num_images, p.height, p.width, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # 1/255
    assert got.std() > 1  # an image, not a constant
    # One UNet call per step; guidance batches the negative into the same call.
    assert got_calls == ref_calls == p.num_inference_steps
