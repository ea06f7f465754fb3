import threading

import numpy as np
import pytest
import torch

from serve_app.engine.cancel import CancelToken
from serve_app.engine.stages import StageRecorder
from serve_app.errors import Cancelled, PromptTooLong
from serve_app.messages import GenerationParams

P = GenerationParams("a cat on a windowsill", None, 256, 256, 6, 0.0, 11)


def test_embeddings_have_the_prompts_real_length(encoder):
    emb = encoder.encode("a cat", "blurry, dark, low quality", with_negative=True)
    n_prompt = len(encoder.token_ids("a cat"))
    n_negative = len(encoder.token_ids("blurry, dark, low quality"))
    assert emb.prompt.shape == (n_prompt, 32)
    assert emb.negative.shape == (n_negative, 32)
    assert n_prompt < n_negative < 512
    assert emb.prompt.device.type == "cpu"


def test_without_guidance_no_negative_is_encoded(encoder):
    assert encoder.encode("a cat", "ignored", with_negative=False).negative is None


def test_too_long_prompt_says_how_long_and_the_limit(encoder):
    with pytest.raises(PromptTooLong) as err:
        encoder.encode("word " * 600, None, with_negative=False)
    assert err.value.param == "prompt" and err.value.limit == 512 and err.value.tokens > 512
    assert f"{err.value.tokens} tokens" in str(err.value) and "at most 512" in str(err.value)
    with pytest.raises(PromptTooLong) as err:
        encoder.encode("ok", "word " * 600, with_negative=True)
    assert err.value.param == "negative_prompt"


def test_encode_stops_when_cancelled(encoder):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled) as err:
        encoder.encode("a cat", None, with_negative=False, cancel=token)
    assert err.value.stage == "encode"


def cancel_on_call(module, token, call_number):
    """Cancel `token` when `module` is called for the `call_number`-th time."""
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == call_number:
            token.cancel()

    return module.register_forward_pre_hook(hook), calls


def test_cancel_before_start_runs_nothing(encoder, denoiser):
    emb = encoder.encode(P.prompt, None, False)
    token = CancelToken()
    token.cancel()
    handle, calls = cancel_on_call(denoiser.transformer.t_embedder, CancelToken(), 0)
    try:
        with pytest.raises(Cancelled) as err:
            denoiser.generate(P, emb, cancel=token)
    finally:
        handle.remove()
    assert (err.value.stage, err.value.steps_done, len(calls)) == ("queued", 0, 0)


def test_cancel_mid_loop_stops_at_the_next_step(encoder, denoiser):
    emb = encoder.encode(P.prompt, None, False)
    token = CancelToken()
    handle, calls = cancel_on_call(denoiser.transformer.t_embedder, token, 3)
    recorder = StageRecorder(denoiser.device)
    try:
        with pytest.raises(Cancelled) as err:
            denoiser.generate(P, emb, cancel=token, recorder=recorder)
    finally:
        handle.remove()
    # The step in flight when the cancel came finishes; no further step starts.
    assert (err.value.stage, err.value.steps_done, err.value.steps_total) == ("denoise", 3, 6)
    assert len(calls) == 3
    assert recorder.stages["denoise"].outcome == "cancelled"
    assert "decode" not in recorder.stages


def test_cancel_during_decode_skips_the_remaining_images(encoder, denoiser):
    p = GenerationParams(P.prompt, None, 256, 256, 2, 0.0, 1, num_images=3)
    emb = encoder.encode(p.prompt, None, False)
    token = CancelToken()
    handle, calls = cancel_on_call(denoiser.vae.decoder, token, 1)
    recorder = StageRecorder(denoiser.device)
    try:
        with pytest.raises(Cancelled) as err:
            denoiser.generate(p, emb, cancel=token, recorder=recorder)
    finally:
        handle.remove()
    assert (err.value.stage, err.value.steps_done) == ("decode", 2)
    assert len(calls) == 1
    assert recorder.stages["decode"].outcome == "cancelled"


def test_records_every_stage_and_step(encoder, denoiser):
    recorder = StageRecorder(denoiser.device)
    denoiser.generate(P, encoder.encode(P.prompt, None, False), recorder=recorder)
    assert set(recorder.stages) == {"denoise", "decode"}
    assert all(rec.outcome == "ok" and rec.seconds > 0 for rec in recorder.stages.values())
    assert len(recorder.step_seconds) == P.num_inference_steps
    assert recorder.vram_peaks() == {"denoise": 0, "decode": 0}  # CPU


def test_concurrent_calls_do_not_share_state(encoder, denoiser):
    """Two requests running at once on one denoiser each get their own image."""
    seeds = [5, 6, 7, 8]
    emb = encoder.encode(P.prompt, None, False)
    alone = {
        s: denoiser.generate(GenerationParams(**{**P.__dict__, "seed": s}), emb)[0] for s in seeds
    }
    together = {}

    def run(seed):
        together[seed] = denoiser.generate(GenerationParams(**{**P.__dict__, "seed": seed}), emb)[0]

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        np.testing.assert_array_equal(alone[s], together[s])


def test_cancelling_one_request_leaves_the_other_running(encoder, denoiser):
    emb = encoder.encode(P.prompt, None, False)
    expected = denoiser.generate(P, emb)[0]
    victim, results = CancelToken(), {}

    def run(name, token):
        try:
            results[name] = denoiser.generate(P, emb, cancel=token)[0]
        except Cancelled as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("victim", victim)),
        threading.Thread(target=run, args=("other", CancelToken())),
    ]
    for t in threads:
        t.start()
    victim.cancel()
    for t in threads:
        t.join()
    assert isinstance(results["victim"], Cancelled)
    np.testing.assert_array_equal(results["other"], expected)


def test_the_graphed_forward_computes_what_the_stock_encoder_does(encoder):
    """What the CUDA-graph path relies on: no padding mask, the layers after
    hidden_states[-2] skipped, and padding after the real tokens changes none of them."""
    ids = [encoder.token_ids("a cat on a mat"), encoder.token_ids("a much longer prompt here")]
    padded = encoder._causal_forward(encoder._padded(ids, 64))
    for row, i in enumerate(ids):
        stock = encoder._forward(encoder._padded([i], len(i)), None)[0]
        torch.testing.assert_close(padded[row, : len(i)], stock, rtol=1e-5, atol=1e-5)


def test_warmup_runs_every_path_a_request_can_take(denoiser, monkeypatch):
    """Unmasked and masked guidance batches compile to different graphs: both warm."""
    calls, forward = [], denoiser._forward

    def spy(x, t, cap_feats, cache):
        calls.append([c.shape[0] for c in cap_feats])
        return forward(x, t, cap_feats, cache)

    monkeypatch.setattr(denoiser, "_forward", spy)
    took = denoiser.warmup([(256, 256)])
    assert set(took) == {"256x256"}
    assert calls == [[40], [40, 40], [40, 8]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embeddings_cross_processes_as_numpy_bit_exactly(dtype):
    from serve_app.engine.zimage import PromptEmbeddings

    emb = PromptEmbeddings(torch.randn(7, 16).to(dtype), torch.randn(3, 16).to(dtype))
    prompt, negative, name = emb.to_arrays()
    prompt.setflags(write=False)  # as they arrive through Ray's object store
    back = PromptEmbeddings.from_arrays(prompt, negative, name)
    assert back.prompt.dtype == dtype and torch.equal(back.prompt, emb.prompt)
    assert torch.equal(back.negative, emb.negative)


def test_images_come_out_contiguous(encoder, denoiser):
    """Row-major HxWx3: the PNG encoder took 2.3x as long on the VAE's planar layout."""
    p = GenerationParams(P.prompt, None, 256, 256, 1, 0.0, 1)
    [pixels] = denoiser.generate(p, encoder.encode(p.prompt, None, False))
    assert pixels.shape == (256, 256, 3) and pixels.flags.c_contiguous


@pytest.mark.parametrize("when_queued", [False, True])
def test_progress_reports_every_step_then_decode_in_order(encoder, denoiser, when_queued):
    """At once (CPU): each report right after its step. When queued (GPU): a step's
    report after the next step's work is launched, the last ones after the decode's."""
    events = []
    hooks = [
        denoiser.transformer.t_embedder.register_forward_pre_hook(lambda *_: events.append("step")),
        denoiser.vae.decoder.register_forward_pre_hook(lambda *_: events.append("vae")),
    ]
    p = GenerationParams(P.prompt, None, 256, 256, 3, 0.0, 1)
    denoiser.progress_when_queued = when_queued
    try:
        denoiser.generate(
            p, encoder.encode(p.prompt, None, False), progress=lambda *r: events.append(r)
        )
    finally:
        denoiser.progress_when_queued = False
        for h in hooks:
            h.remove()
    d1, d2, d3, dec = ("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 3, 3)
    if when_queued:
        assert events == ["step", "step", d1, "step", d2, "vae", d3, dec]
    else:
        assert events == ["step", d1, "step", d2, "step", d3, dec, "vae"]


def test_after_warmup_no_request_recompiles(tiny_path, monkeypatch):
    """The compiled engine, warmed at its sizes, serves requests of other prompt lengths,
    guidance on and off, masked or not, without a recompilation (Dynamo's graphs and
    guards; the "eager" backend skips code generation, which does not change them)."""
    from serve_app.engine.zimage import PromptEmbeddings, ZImageDenoiser

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "eager"}),
    )
    torch._dynamo.reset()
    try:
        den = ZImageDenoiser.from_pretrained(
            tiny_path, torch.device("cpu"), torch.float32, compile=True
        )
        den.warmup([(256, 256), (320, 256)])
        hidden = den.transformer.config.cap_feat_dim
        with torch._dynamo.config.patch(error_on_recompile=True):
            for size, guidance, n_prompt, n_negative in [
                ((256, 256), 0.0, 65, None),
                ((320, 256), 0.0, 7, None),
                ((256, 256), 5.0, 65, 20),
                ((256, 256), 5.0, 20, 65),
                ((320, 256), 5.0, 100, 100),
                ((256, 320), 5.0, 130, 3),
            ]:
                p = GenerationParams("x", None, *size, 2, guidance, 0)
                negative = None if n_negative is None else torch.zeros(n_negative, hidden)
                den.generate(p, PromptEmbeddings(torch.zeros(n_prompt, hidden), negative))
    finally:
        torch._dynamo.reset()


def test_fused_projections_draw_the_same_image_with_the_same_weight_memory(
    tiny_path, encoder, denoiser
):
    from serve_app.engine.zimage import ZImageDenoiser

    fused = ZImageDenoiser.from_pretrained(
        tiny_path, torch.device("cpu"), torch.float32, fuse_projections=True
    )
    attn = fused.transformer.layers[0].attention
    assert hasattr(attn, "to_qkv") and not hasattr(attn, "to_q")
    assert hasattr(fused.transformer.layers[0].feed_forward, "w13")

    def weight_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert weight_bytes(fused.transformer) == weight_bytes(denoiser.transformer)
    p = GenerationParams(P.prompt, "blurry", 256, 256, 3, 4.0, 5)
    emb = encoder.encode(p.prompt, p.negative_prompt, True)
    [ours], [theirs] = fused.generate(p, emb), denoiser.generate(p, emb)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
