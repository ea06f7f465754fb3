"""Our changes to Z-Image's transformer: real-arithmetic rotary attention, optional fused
projections, and a forward that computes once per request what every step shares."""

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import (
    SEQ_MULTI_OF,
    FeedForward,
    ZSingleStreamAttnProcessor,
)
from torch import nn
from torch.nn.utils.rnn import pad_sequence

PATCH, F_PATCH = 2, 1  # the transformer's spatial and temporal patch sizes


class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):
    """The stock Z-Image attention processor with the rotary embedding in real arithmetic.

    The stock one rotates q and k through complex64 views; torch.compile generates no
    code for complex ops, so each rotation stays a chain of full-size float32 passes.
    Written as (x1*cos - x2*sin, x1*sin + x2*cos), the same rotation fuses with its
    neighbours. Same math: tests/engine/test_equivalence.py holds the pixels to stock.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None
    ):
        if hasattr(attn, "to_qkv"):  # fused by fuse_projections: one GEMM for the three
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (p(hidden_states) for p in (attn.to_q, attn.to_k, attn.to_v))
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            if freqs_cis.is_complex():
                freqs_cis = torch.view_as_real(freqs_cis)
            cos, sin = freqs_cis[..., 0].unsqueeze(2), freqs_cis[..., 1].unsqueeze(2)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


class RealRopeEmbedder:
    """The transformer's rotary table, handed out as real [..., 2] (cos, sin) pairs.

    Only RealRopeAttnProcessor reads the table; given real pairs it never touches a
    complex tensor, which torch.compile would otherwise leave as separate kernels.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.inner(ids))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class FusedFeedForward(nn.Module):
    """Z-Image's SwiGLU feed-forward, w2(silu(w1 x) * w3 x), with w1 and w3 as one GEMM."""

    def __init__(self, ff: FeedForward):
        super().__init__()
        self.w13 = _fused_linear(ff.w1, ff.w3)
        self.w2 = ff.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(x1) * x3)


def _fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the given ones' outputs, concatenated."""
    first = linears[0]
    if any(lin.bias is not None for lin in linears):
        raise ValueError("fusing linear layers with a bias is not implemented")
    fused = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=False,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
    return fused


def fuse_projections(transformer) -> None:
    """In place: each attention's q, k and v projections become one GEMM (`to_qkv`), and
    each feed-forward's w1 and w3 another. The separate weights are dropped, block by
    block, so the weights take no more memory than before."""
    for module in list(transformer.modules()):
        if isinstance(getattr(module, "processor", None), RealRopeAttnProcessor):
            module.to_qkv = _fused_linear(module.to_q, module.to_k, module.to_v)
            del module.to_q, module.to_k, module.to_v
        for name, child in list(module.named_children()):
            if isinstance(child, FeedForward):
                setattr(module, name, FusedFeedForward(child))


def prepare_transformer(transformer, attention_backend: str = "native", fuse: bool = False):
    """Our changes to a loaded ZImageTransformer2DModel, in place: real-valued RoPE
    attention, fused projections if `fuse`, and the attention backend."""
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), ZSingleStreamAttnProcessor):
            module.set_processor(RealRopeAttnProcessor())
    transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    if fuse:
        fuse_projections(transformer)
    if attention_backend != "native":
        transformer.set_attention_backend(attention_backend)
    return transformer


def forward(tr, x: list, t: torch.Tensor, cap_feats: list, cache: dict) -> list:
    """ZImageTransformer2DModel.forward (basic mode, patch 2x2), with what does not
    depend on the latents or the timestep computed once per request and kept in
    `cache`: the caption's embedding and refiner blocks, position ids, rotary tables,
    padding and attention masks. The stock forward recomputes them every step: about
    a hundred small kernels and their Python, with the device idle after each step's
    sync (an H200 at 768x768: 57 ms a step for 51 ms of kernels, *step-idle-probe*).
    Same math:
    tests/engine/test_equivalence.py holds the pixels to the stock pipeline's."""
    if not cache:
        cache.update(invariants(tr, x, cap_feats))
    adaln = tr.t_embedder(t * tr.t_scale).type_as(x[0])
    patches = []
    for image in x:
        flat = tr._patchify_image(image, PATCH, F_PATCH)[0]
        if cache["x_pad"]:
            flat = torch.cat([flat, flat[-1:].repeat(cache["x_pad"], 1)], dim=0)
        patches.append(flat)
    embedded = tr.all_x_embedder[f"{PATCH}-{F_PATCH}"](torch.cat(patches, dim=0))
    embedded = torch.where(cache["x_pad_mask"], tr.x_pad_token, embedded)
    hidden = pad_sequence(list(embedded.split(cache["x_seqlens"])), batch_first=True)
    for layer in tr.noise_refiner:
        # No mask: the images of one request have one size, hence one length.
        hidden = layer(hidden, None, cache["x_freqs"], adaln, None, None, None)
    cap, x_len, cap_len = cache["cap"], cache["x_seqlens"], cache["cap_seqlens"]
    unified = pad_sequence(
        [torch.cat([hidden[i][: x_len[i]], cap[i][: cap_len[i]]]) for i in range(len(x))],
        batch_first=True,
    )
    for layer in tr.layers:
        unified = layer(unified, cache["mask"], cache["freqs"], adaln, None, None, None)
    unified = tr.all_final_layer[f"{PATCH}-{F_PATCH}"](unified, c=adaln)
    return tr.unpatchify(list(unified.unbind(dim=0)), cache["sizes"], PATCH, F_PATCH)


def invariants(tr, x: list, cap_feats: list) -> dict:
    """The part of the transformer's forward that is the same at every step of a
    request, as the stock forward computes it (patchify_and_embed, _prepare_sequence,
    the caption refiner, _build_unified_sequence)."""
    device = x[0].device
    caps, cap_pos, cap_pad, x_pos, x_pad, sizes = [], [], [], [], [], []
    for image, cap in zip(x, cap_feats, strict=True):
        cap_grid = (len(cap) + (-len(cap)) % SEQ_MULTI_OF, 1, 1)
        padded, pos, pad, cap_len, _ = tr._pad_with_ids(cap, cap_grid, (1, 0, 0), device)
        caps.append(padded)
        cap_pos.append(pos)
        cap_pad.append(pad)
        flat, size, grid = tr._patchify_image(image, PATCH, F_PATCH)
        _, pos, pad, x_len, _ = tr._pad_with_ids(flat, grid, (cap_len + 1, 0, 0), device)
        x_pos.append(pos)
        x_pad.append(pad)
        sizes.append(size)
    x_seqlens = [len(p) for p in x_pad]
    x_freqs = pad_sequence(
        list(tr.rope_embedder(torch.cat(x_pos)).split(x_seqlens)), batch_first=True
    )
    cap_seqlens = [len(c) for c in caps]
    cap = tr.cap_embedder(torch.cat(caps, dim=0))
    cap, cap_freqs, cap_mask, _, _ = tr._prepare_sequence(
        list(cap.split(cap_seqlens)), cap_pos, cap_pad, tr.cap_pad_token, None, device
    )
    for layer in tr.context_refiner:
        cap = layer(cap, cap_mask, cap_freqs)
    freqs = pad_sequence(
        [
            torch.cat([x_freqs[i][: x_seqlens[i]], cap_freqs[i][: cap_seqlens[i]]])
            for i in range(len(x))
        ],
        batch_first=True,
    )
    lengths = [a + b for a, b in zip(x_seqlens, cap_seqlens, strict=True)]
    mask = None
    if len(set(lengths)) > 1:
        mask = torch.zeros((len(x), max(lengths)), dtype=torch.bool, device=device)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
    return {
        "x_seqlens": x_seqlens,
        "x_pad": x_len - len(flat),  # padding tokens after each image's patches
        "x_pad_mask": torch.cat(x_pad).unsqueeze(-1),
        "x_freqs": x_freqs,
        "cap": cap,
        "cap_seqlens": cap_seqlens,
        "freqs": freqs,
        "mask": mask,
        "sizes": sizes,
    }
