"""The embedded `tiny-sdxl` checkpoint: SDXL's architecture (two CLIP text encoders, a
UNet with text-time micro-conditioning, a 4-channel VAE) at small sizes, random weights,
CLIP tokenizers built here. Generated deterministically on first use in diffusers format,
with two random adapters in its `loras/` folder, and loaded like a real download. It
draws noise, not pictures."""

from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch

from serve_app.engine.checkpoint import save_once
from serve_app.engine.tiny import random_lora, save_kohya

TINY_NAME = "sdxl-tiny-v2"

# Text to train the tokenizers' merges on; any fixed text gives fixed tokenizers.
_CORPUS = [
    "a photo of a cat sitting on a windowsill in the morning light",
    "an oil painting of a lighthouse on a cliff during a storm, dramatic sky",
    "a watercolor illustration of a fox in a snowy forest, soft colors",
    "portrait of an old sailor with a white beard, studio lighting",
    "ink drawing, chinese painting style, mountains, river, pine trees, mist",
    "mountains, river, trees, clouds, sunset, ocean, beach, desert, flowers",
]


def build_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer (byte-level BPE with "</w>" word ends, lower case, 77 tokens)
    whose merges are learned from a fixed corpus. OpenCLIP-bigG's pads with "!"."""
    from tokenizers import pre_tokenizers as pre
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    # The corpus split as CLIPTokenizer splits text, so that the merges apply.
    clip = CLIPTokenizer(vocab={s: i for i, s in enumerate(specials)}, merges=[])
    backend = clip.backend_tokenizer
    words: Counter = Counter()
    for text in _CORPUS:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(
            backend.normalizer.normalize_str(text)
        ):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    alphabet = sorted(pre.ByteLevel.alphabet())  # any byte, within a word or ending it
    merges = learn_merges(words, 164)
    tokens = [*specials, *alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def learn_merges(words: Counter, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges of `words` (tuples of symbols, with their counts): the most
    frequent adjacent pair first, ties broken by the pair itself, so that the same corpus
    gives the same tokenizer in every process. (tokenizers' trainer breaks ties in
    another order in each, and the tiny checkpoint's prompt ids changed with it.)"""
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def build_tiny_pipeline():
    """The tiny SDXL pipeline in memory (random weights, fixed seeds), with the
    EulerAncestral scheduler of the engine this service replaces."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + pooled text
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=16,
        sample_size=32,
    )
    torch.manual_seed(3)
    vae = AutoencoderKL(**vae_config([8, 8, 16, 16], layers_per_block=1, norm_num_groups=8))
    return assemble((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), unet, vae)


def assemble(tokenizers: tuple, text_encoders: tuple, unet, vae):
    """A StableDiffusionXLPipeline of these components and the EulerAncestral scheduler
    with SDXL base's settings (no watermarker)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER),
        add_watermarker=False,
    )


# SDXL base's scheduler settings.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def vae_config(block_out_channels: list[int], layers_per_block: int, norm_num_groups: int):
    """SDXL's 4-channel VAE at the given widths."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def ensure_tiny(root: Path, name: str = TINY_NAME) -> Path:
    """Return the checkpoint folder `root/name`, generating it if it is missing."""

    def save(folder: Path) -> None:
        pipe = build_tiny_pipeline()
        pipe.save_pretrained(folder, safe_serialization=True)
        save_tiny_loras(folder / "loras", pipe.unet)

    return save_once(root / name, save)


# The generated adapters: attention (diffusers' format, with PEFT's config) and
# feed-forward plus projections with alpha half the rank (kohya's format).
ATTENTION = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
FEED_FORWARD = (
    r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)


def save_tiny_loras(folder: Path, unet) -> None:
    """tiny-style.safetensors (diffusers) and tiny-kohya.safetensors (kohya) in `folder`."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    folder.mkdir(parents=True, exist_ok=True)
    state, config = random_lora(unet, ATTENTION, rank=4, alpha=4, seed=20)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=state,
        weight_name="tiny-style.safetensors",
        unet_lora_adapter_metadata=config,
    )
    state, _ = random_lora(unet, FEED_FORWARD, rank=4, alpha=2, seed=21)
    save_kohya(folder / "tiny-kohya", state, alpha=2)
