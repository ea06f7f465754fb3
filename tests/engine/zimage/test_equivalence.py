"""Our Z-Image encoder + loop against the stock diffusers ZImagePipeline, float32 on CPU."""

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from serve_app.messages import GenerationParams


@pytest.fixture(scope="module")
def pipe(tiny_path):
    # Loaded by diffusers' own loader from the same folder: the tiny checkpoint is a valid
    # diffusers checkpoint, and the reference shares nothing with our loading code.
    return ZImagePipeline.from_pretrained(tiny_path, torch_dtype=torch.float32)


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def stock(pipe, p: GenerationParams, sigmas=None):
    calls, handle = count_calls(pipe.transformer.t_embedder)
    try:
        images = pipe(
            p.prompt,
            negative_prompt=p.negative_prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=p.num_inference_steps,
            sigmas=sigmas,
            guidance_scale=p.guidance_scale,
            num_images_per_prompt=p.num_images,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            output_type="np",
        ).images
    finally:
        handle.remove()
    # The pipeline's own float -> uint8 conversion (VaeImageProcessor.numpy_to_pil).
    return (images * 255).round().astype("uint8"), len(calls)


def ours(encoder, denoiser, p: GenerationParams, sigmas=None):
    calls, handle = count_calls(denoiser.transformer.t_embedder)
    try:
        emb = encoder.encode_params(p)
        images = np.stack(denoiser.generate(p, emb, sigmas=sigmas))
    finally:
        handle.remove()
    return images, len(calls)


CASES = {
    "turbo-no-guidance": GenerationParams("a red fox in snow", None, 256, 256, 9, 0.0, 42),
    "guidance-negative-2-images": GenerationParams(
        "a lighthouse in a storm", "blurry, low quality", 320, 256, 6, 5.0, 7, num_images=2
    ),
    "guidance-empty-negative": GenerationParams("ramen, top view", None, 256, 320, 4, 1.5, 2**40),
    # Prompt and negative padded to different lengths (an attention mask), and an image
    # of 17x16 patches, which the transformer pads to a multiple of 32 tokens.
    "masked-guidance-padded-image": GenerationParams(
        "a cat",
        "blurry, dark, noisy, low quality, overexposed, underexposed, cropped, watermark, "
        "text, signature, deformed hands, extra fingers, jpeg artifacts, oversaturated",
        272,
        256,
        4,
        3.0,
        9,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_same_pixels_and_calls_as_stock_pipeline(name, pipe, encoder, denoiser):
    p = CASES[name]
    ref, ref_calls = stock(pipe, p)
    got, got_calls = ours(encoder, denoiser, p)
    assert got.shape == ref.shape == (p.num_images, p.height, p.width, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # 1/255
    assert got.std() > 1  # an image, not a constant
    # One transformer call per step; guidance batches the negative into the same call.
    assert got_calls == ref_calls == p.num_inference_steps


def test_step_with_zero_dt_is_skipped(pipe, encoder, denoiser):
    # Two equal sigmas in a row give dt == 0: the stock loop still runs that forward.
    sigmas = [1.0, 1.0, 0.6, 0.3]
    p = GenerationParams("a bowl of fruit", None, 256, 256, len(sigmas), 0.0, 3)
    ref, ref_calls = stock(pipe, p, sigmas=sigmas)
    got, got_calls = ours(encoder, denoiser, p, sigmas=sigmas)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert (ref_calls, got_calls) == (4, 3)
