"""Z-Image with `split_guidance`: a guided step's two passes on two copies of the
transformer (on the CPU: two CPU copies) draw what one batch of both draws."""

import threading

import numpy as np
import pytest
import torch

from serve_app.messages import GenerationParams

PROMPT = "a cat on a windowsill"
# Negative prompts whose captions pad (to 32 tokens) to the prompt's length, and to
# another one: unsplit, the latter is a batch with padding and an attention mask.
NEGATIVES = {
    "same padded length": "blurry",
    "another padded length": "blurry, low quality, ugly, deformed, extra fingers, watermark, "
    "text, signature, jpeg artifacts, out of focus, grainy",
}
# float32 on both paths; they differ only in how the arithmetic is grouped (one batch
# of two, padded and masked where the captions' lengths differ, against two batches of
# one), so in the order of float32 roundings (eps 1.2e-7) over a few layers and steps:
# 5e-7 measured here. A pass run with the wrong caption, or the passes swapped, is
# orders of magnitude further (tests below).
LATENTS_REL_L2 = 1e-5
PIXEL_LEVELS = 1  # a rounding at a level's edge may land either side


@pytest.fixture(scope="module")
def split():
    from serve_app.engine import load_denoiser

    return load_denoiser("tiny", "cpu", "float32", options={"split_guidance": True})


def padded(n: int) -> int:
    return -(-n // 32) * 32


def draw(den, params, embeddings) -> tuple[np.ndarray, torch.Tensor]:
    """The image and the final latents (as the VAE gets them)."""
    kept, to_vae = [], den.to_vae
    den.to_vae = lambda latents: kept.append(latents.clone()) or to_vae(latents)
    try:
        [image] = den.generate(params, embeddings)
    finally:
        del den.to_vae
    return image, kept[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("negative", NEGATIVES)
def test_split_guidance_draws_what_one_device_draws(encoder, denoiser, split, negative):
    p = GenerationParams(PROMPT, NEGATIVES[negative], 256, 256, 3, 4.0, 5)
    emb = encoder.encode_params(p)
    same = padded(len(emb["prompt"])) == padded(len(emb["negative"]))
    assert same == (negative == "same padded length")
    # The second copy runs every step, on its worker thread.
    threads: list[str] = []
    hook = split.split.model.t_embedder.register_forward_hook(
        lambda *_: threads.append(threading.current_thread().name)
    )
    try:
        image, latents = draw(split, p, emb)
    finally:
        hook.remove()
    assert len(threads) == 3 and all(t.startswith("split-cfg") for t in threads), threads
    one_image, one_latents = draw(denoiser, p, emb)
    assert rel_l2(latents, one_latents) <= LATENTS_REL_L2
    assert np.abs(image.astype(int) - one_image.astype(int)).max() <= PIXEL_LEVELS


def test_each_pass_has_its_own_caption(encoder, denoiser, split):
    """What the equivalence above would catch, and by how much: both passes on the
    prompt (no guidance at all) and the passes swapped (guidance away from the prompt)
    end far outside its tolerance."""
    p = GenerationParams(PROMPT, NEGATIVES["another padded length"], 256, 256, 3, 4.0, 5)
    emb = encoder.encode_params(p)
    _, reference = draw(denoiser, p, emb)
    wrong = {
        "the prompt twice": {"prompt": emb["prompt"], "negative": emb["prompt"]},
        "swapped": {"prompt": emb["negative"], "negative": emb["prompt"]},
    }
    for name, embeddings in wrong.items():
        _, latents = draw(split, p, embeddings)
        assert rel_l2(latents, reference) > 100 * LATENTS_REL_L2, name


def test_steps_without_guidance_stay_on_the_first_device(encoder, denoiser, split):
    p = GenerationParams(PROMPT, None, 256, 256, 3, 0.0, 5)
    emb = encoder.encode_params(p)
    calls = []
    hook = split.split.model.t_embedder.register_forward_hook(lambda *_: calls.append(1))
    try:
        image, _ = draw(split, p, emb)
    finally:
        hook.remove()
    assert calls == []
    assert np.array_equal(image, draw(denoiser, p, emb)[0])


def test_warmup_takes_the_split_path(split, monkeypatch):
    """Its guided calls run a pass on each copy, each with its own caption (the warm-up's
    negatives of the prompt's length and of another), so compilation happens there."""
    from serve_app.engine.zimage import denoiser as module

    calls, forward = [], module.forward

    def spy(tr, x, t, cap_feats, cache):
        copy = "second" if tr is split.split.model else "first"
        calls.append((copy, [c.shape[0] for c in cap_feats]))
        return forward(tr, x, t, cap_feats, cache)

    monkeypatch.setattr(module, "forward", spy)
    split.warmup([(256, 256)])
    first = [lengths for copy, lengths in calls if copy == "first"]
    assert first == [[40], [40], [40]]  # no guidance, then the prompt of each guided call
    assert [lengths for copy, lengths in calls if copy == "second"] == [[40], [8]]


def test_after_warmup_no_split_request_recompiles(tiny_path, eager_compile):
    """Both copies compiled, warmed up, then guided requests of other lengths, masked or
    not (unsplit), without a recompilation (see test_denoiser's)."""
    from serve_app.engine.zimage import Options, ZImageDenoiser

    den = ZImageDenoiser.from_pretrained(
        tiny_path, torch.device("cpu"), torch.float32, compile=True,
        options=Options(split_guidance=True),
    )  # fmt: skip
    den.warmup([(256, 256)])
    hidden = den.transformer.config.cap_feat_dim
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n_prompt, n_negative in [(65, 20), (20, 65), (100, 100), (3, 130)]:
            p = GenerationParams("x", "y", 256, 256, 2, 5.0, 0)
            emb = {
                "prompt": torch.zeros(n_prompt, hidden),
                "negative": torch.zeros(n_negative, hidden),
            }
            den.generate(p, emb)


def test_split_guidance_with_adapters_is_refused(tiny_path):
    from serve_app.engine import LoraOptions
    from serve_app.engine.zimage import Options, ZImageDenoiser

    with pytest.raises(ValueError, match="split_guidance excludes LoRA adapters.*lora_dir: null"):
        ZImageDenoiser.from_pretrained(
            tiny_path, torch.device("cpu"), torch.float32,
            options=Options(split_guidance=True), lora=LoraOptions(),
        )  # fmt: skip


def test_one_visible_gpu_is_refused_at_load(tiny_path, monkeypatch):
    from serve_app.engine.zimage import Options, ZImageDenoiser

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 CUDA devices visible to the Denoiser, 1 are"):
        ZImageDenoiser.from_pretrained(
            tiny_path, torch.device("cuda:0"), torch.bfloat16,
            options=Options(split_guidance=True),
        )  # fmt: skip
