"""Z-Image's denoiser: its warm-up, compilation and fused projections."""

import numpy as np
import pytest
import torch

from serve_app.engine.graphs import CudaGraphs
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


class Replays(CudaGraphs):
    """CudaGraphs' contract on a CPU: a capture keeps the call and copies of its inputs;
    a replay copies the new inputs into those copies and runs the captured call on them.
    As with a CUDA graph, whatever the captured call reads besides its inputs is what
    the capturing call (the warm-up's) saw, so a step that leaks request state past its
    inputs draws another image."""

    def capture(self, key, fn, *inputs):
        self._graphs[key] = (fn, [x.clone() for x in inputs], None)

    def replay(self, key, *inputs):
        fn, static, _ = self._graphs[key]
        for into, x in zip(static, inputs, strict=True):
            into.copy_(x)
        self.replays += 1
        return fn(*static)


def test_graphed_steps_draw_what_unreplayed_steps_draw(tiny_path, encoder):
    """Steps without guidance replay the warm-up's captures for their padded caption
    length; prompts and seeds other than the warm-up's draw what they draw without."""
    from serve_app.engine.zimage import Options, ZImageDenoiser
    from serve_app.engine.zimage.denoiser import GRAPH_CAPTION_TOKENS

    graphs = Options(cuda_graphs=True)
    den = ZImageDenoiser.from_pretrained(
        tiny_path, torch.device("cpu"), torch.float32, options=graphs
    )
    assert den.graphs is None  # there are no CUDA graphs on a CPU
    den.graphs = Replays(den.device)
    den.warmup([(256, 256)])
    captured = {key[0] for key in den.graphs._graphs}
    assert captured == {f"transformer:[{n}]" for n in GRAPH_CAPTION_TOKENS}
    for prompt, seed in (("a red fox in the snow", 3), ("a lighthouse " * 12, 8)):
        p = GenerationParams(prompt, None, 256, 256, 3, 0.0, seed)
        emb = encoder.encode_params(p)
        before = den.graphs.replays
        graphed = den.generate(p, emb)[0]
        assert den.graphs.replays - before == 3, "every step replayed"
        graphs, den.graphs = den.graphs, None
        assert np.array_equal(graphed, den.generate(p, emb)[0])
        den.graphs = graphs


def test_fp8_is_refused_where_it_cannot_run(tiny_path):
    from serve_app.engine import LoraOptions
    from serve_app.engine.zimage import Options, ZImageDenoiser

    fp8 = Options(precision="fp8")
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*runs on cpu"):
        ZImageDenoiser.from_pretrained(tiny_path, torch.device("cpu"), torch.float32, options=fp8)
    with pytest.raises(ValueError, match="precision fp8 excludes LoRA adapters"):
        ZImageDenoiser.from_pretrained(
            tiny_path, torch.device("cpu"), torch.float32, options=fp8, lora=LoraOptions()
        )


def test_fp8_targets_the_main_blocks_linear_layers_only(denoiser):
    """Embedders, refiners, modulation and the final layer stay in the model's dtype."""
    import re

    from serve_app.engine.zimage.denoiser import FP8_TARGETS

    linears = [n for n, m in denoiser.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in linears if re.fullmatch(FP8_TARGETS, n)]
    layers = denoiser.transformer.config.n_layers
    assert len(chosen) == 7 * layers  # q, k, v, out; w1, w2, w3 of each main block
    assert all(n.startswith("layers.") for n in chosen)
    kept = set(linears) - set(chosen)
    assert any("adaLN_modulation" in n for n in kept)
    assert any(n.startswith(("noise_refiner", "context_refiner")) for n in kept)
    assert any("final_layer" in n for n in kept) and any("embedder" in n for n in kept)
