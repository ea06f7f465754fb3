"""ZImageTransformer2DModel's forward (basic mode, patch 2x2) over a training batch as
tensors, instead of the stock forward's lists.

The stock forward patchifies, pads and positions each image and caption in a Python
loop: several hundred small kernels per sample, forwards and backwards, so a GPU step of
the demo's tiny transformer at batch 96 took 0.25 s of mostly launches (H200,
load_tests/results/NVIDIA-H200-2026-12-03-demo-train-*.log). Here the images share one
size and the captions of one call one padded length, so each stage runs once for the
whole batch. Same math, same parameters: tests/training/test_forward.py holds it to the
stock forward, and the service draws with the stock layout.
"""

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

PATCH = 2


def padded_length(n: int) -> int:
    """A caption of `n` tokens, padded as the stock forward pads it."""
    return n + (-n) % SEQ_MULTI_OF


def forward(
    tr,
    x: torch.Tensor,
    t: torch.Tensor,
    cap: torch.Tensor,
    cap_lengths: torch.Tensor,
    lora_scale: float | None = None,
) -> torch.Tensor:
    """The transformer's prediction for latents `x` (B, C, H, W) at timesteps `t` (B,),
    given captions `cap` (B, L, D) of `cap_lengths` (B,) tokens each, L a multiple of
    SEQ_MULTI_OF (see padded_length) and the same for all; positions past a caption's
    length are padding, whatever they hold. `lora_scale`: the adapters' scale, as
    joint_attention_kwargs' "scale" sets it in the stock forward."""
    if lora_scale is not None:
        scale_lora_layers(tr, lora_scale)
    try:
        return _forward(tr, x, t, cap, cap_lengths)
    finally:
        if lora_scale is not None:
            unscale_lora_layers(tr, lora_scale)


def _forward(tr, x, t, cap, cap_lengths):
    b, c, h, w = x.shape
    ht, wt, length = h // PATCH, w // PATCH, cap.shape[1]
    if length % SEQ_MULTI_OF or (ht * wt) % SEQ_MULTI_OF:
        raise ValueError(f"caption length {length} and patches {ht * wt}: not padded")
    device = x.device
    adaln = tr.t_embedder(t * tr.t_scale).type_as(x)

    # The image: patches (c fastest, then the patch's own rows and columns), positions
    # (caption length + 1, row, column), as _patchify_image and _pad_with_ids make them.
    patches = x.view(b, c, ht, PATCH, wt, PATCH).permute(0, 2, 4, 3, 5, 1)
    hidden = tr.all_x_embedder[f"{PATCH}-1"](patches.reshape(b, ht * wt, PATCH * PATCH * c))
    grid = torch.stack(
        torch.meshgrid(
            torch.arange(length + 1, length + 2, device=device),
            torch.arange(ht, device=device),
            torch.arange(wt, device=device),
            indexing="ij",
        ),
        dim=-1,
    ).flatten(0, 2)
    x_freqs = tr.rope_embedder(grid.to(torch.int32)).expand(b, -1, -1)
    for layer in tr.noise_refiner:
        hidden = layer(hidden, None, x_freqs, adaln, None, None, None)

    # The caption: past its length the pad token; positions (1..length, 0, 0), the
    # padding's too, as _pad_with_ids gives a caption's grid its padded length.
    pad = torch.arange(length, device=device)[None, :] >= cap_lengths[:, None].to(device)
    embedded = torch.where(pad[..., None], tr.cap_pad_token, tr.cap_embedder(cap))
    positions = torch.zeros(length, 3, dtype=torch.int32, device=device)
    positions[:, 0] = torch.arange(1, length + 1, device=device)
    cap_freqs = tr.rope_embedder(positions).expand(b, -1, -1)
    for layer in tr.context_refiner:
        embedded = layer(embedded, None, cap_freqs)

    unified = torch.cat([hidden, embedded], dim=1)
    freqs = torch.cat([x_freqs, cap_freqs], dim=1)
    for layer in tr.layers:
        unified = layer(unified, None, freqs, adaln, None, None, None)
    out = tr.all_final_layer[f"{PATCH}-1"](unified, c=adaln)[:, : ht * wt]
    out = out.reshape(b, ht, wt, PATCH, PATCH, tr.out_channels)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(b, tr.out_channels, h, w)
