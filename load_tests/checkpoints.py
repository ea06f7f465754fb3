"""Random-weight Z-Image and SDXL checkpoints at the real sizes, for speed and memory work.

Speed and memory depend on the architecture, not on the weights' values, so a folder
with the real configs (DESIGN.md) and random weights, saved in diffusers format, is
loaded by the service through exactly the code that loads a real download.
"""

import argparse
import time
from pathlib import Path

import torch

from serve_app.engine.checkpoint import save_once
from serve_app.engine.zimage.tiny import assemble, build_tokenizer, vae_config

# Z-Image-Turbo's transformer, Qwen3-4B, and the 16-channel (Flux-style) VAE.
FULL = {
    "transformer": dict(
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        cap_feat_dim=2560,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    ),
    "text_encoder": dict(
        vocab_size=151936,
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
    ),
    "vae": vae_config([128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
}


def _fill(module: torch.nn.Module) -> torch.nn.Module:
    """Random values with sane scales: norms at 1, biases at 0, the rest N(0, 0.02)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    return module


def save_full_zimage(path: Path, device: str = "cuda", dtype=torch.bfloat16) -> Path:
    """Write a full-size random-weight Z-Image checkpoint to `path` (about 20 GB)."""
    path = save_once(path, lambda folder: build_full_zimage(device, dtype).save_pretrained(folder))
    torch.cuda.empty_cache()
    return path


def build_full_zimage(device: str, dtype: torch.dtype):
    """The full-size Z-Image pipeline with random weights, built on `device`."""
    from diffusers import AutoencoderKL
    from diffusers.models.transformers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Built on the meta device, then materialised on the GPU: initialising 10 B
        # parameters on the CPU would take minutes.
        with torch.device("meta"):
            transformer = ZImageTransformer2DModel(**FULL["transformer"])
            text_encoder = Qwen3Model(
                Qwen3Config(**FULL["text_encoder"], pad_token_id=tokenizer.pad_token_id)
            )
            vae = AutoencoderKL(**FULL["vae"])
    finally:
        torch.set_default_dtype(default)
    transformer, text_encoder, vae = (
        _fill(module.to_empty(device=device)) for module in (transformer, text_encoder, vae)
    )
    return assemble(tokenizer, text_encoder, transformer, vae)


# SDXL base 1.0: UNet (2.57B), CLIP-L, OpenCLIP-bigG with projection, 4-channel VAE.
SDXL = {
    "unet": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "text_encoder": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    "text_encoder_2": dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
    ),
}


def save_full_sdxl(path: Path, device: str = "cuda", dtype=torch.bfloat16) -> Path:
    """Write a full-size random-weight SDXL checkpoint to `path` (about 7 GB), with the
    EulerAncestral scheduler and our small CLIP tokenizers (ids below 49408)."""
    path = save_once(path, lambda folder: build_full_sdxl(device, dtype).save_pretrained(folder))
    torch.cuda.empty_cache()
    return path


def build_full_sdxl(device: str, dtype: torch.dtype):
    """The full-size SDXL pipeline with random weights, built on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from serve_app.engine.sdxl import tiny

    tokenizer, tokenizer_2 = tiny.build_tokenizer(), tiny.build_tokenizer(pad_token="!")
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL["unet"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL["text_encoder"], **ids))
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**SDXL["text_encoder_2"], **ids)
            )
            vae = AutoencoderKL(**tiny.vae_config([128, 256, 512, 512], 2, 32))
    finally:
        torch.set_default_dtype(default)
    unet, text_encoder, text_encoder_2, vae = (
        _fill(m.to_empty(device=device)) for m in (unet, text_encoder, text_encoder_2, vae)
    )
    return tiny.assemble((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), unet, vae)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    save_full_zimage(args.path)
    print(f"saved {args.path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
