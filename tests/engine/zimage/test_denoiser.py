"""Z-Image's denoiser: its warm-up, compilation and fused projections."""

import numpy as np
import torch

from serve_app.messages import GenerationParams

P = GenerationParams("a cat on a windowsill", None, 256, 256, 6, 0.0, 11)


def test_warmup_runs_every_path_a_request_can_take(denoiser, monkeypatch):
    """Unmasked and masked guidance batches compile to different graphs: both warm."""
    from serve_app.engine.zimage import denoiser as module

    calls, forward = [], module.forward

    def spy(tr, x, t, cap_feats, cache):
        calls.append([c.shape[0] for c in cap_feats])
        return forward(tr, x, t, cap_feats, cache)

    monkeypatch.setattr(module, "forward", spy)
    took = denoiser.warmup([(256, 256)])
    assert set(took) == {"256x256"}
    assert calls == [[40], [40, 40], [40, 8]]


def test_after_warmup_no_request_recompiles(tiny_path, eager_compile):
    """The compiled engine, warmed at its sizes, serves requests of other prompt lengths,
    guidance on and off, masked or not, without a recompilation (Dynamo's graphs and
    guards; the "eager" backend skips code generation, which does not change them)."""
    from serve_app.engine.zimage import ZImageDenoiser

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
            emb = {"prompt": torch.zeros(n_prompt, hidden)}
            if n_negative is not None:
                emb["negative"] = torch.zeros(n_negative, hidden)
            den.generate(p, emb)


def test_fused_projections_draw_the_same_image_with_the_same_weight_memory(
    tiny_path, encoder, denoiser
):
    from serve_app.engine.zimage import Options, ZImageDenoiser

    fused = ZImageDenoiser.from_pretrained(
        tiny_path, torch.device("cpu"), torch.float32, options=Options(fuse_projections=True)
    )
    attn = fused.transformer.layers[0].attention
    assert hasattr(attn, "to_qkv") and not hasattr(attn, "to_q")
    assert hasattr(fused.transformer.layers[0].feed_forward, "w13")

    def weight_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert weight_bytes(fused.transformer) == weight_bytes(denoiser.transformer)
    p = GenerationParams(P.prompt, "blurry", 256, 256, 3, 4.0, 5)
    emb = encoder.encode_params(p)
    [ours], [theirs] = fused.generate(p, emb), denoiser.generate(p, emb)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
