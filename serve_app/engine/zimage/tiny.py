"""The embedded `tiny` checkpoint: Z-Image architecture, small configs, random weights.

It is generated deterministically on first use and saved in diffusers format, with two
random adapters in its `loras/` folder, then loaded through the same code as a real
download. It draws noise, not pictures: it exists so that the service, its tests and CI
run anywhere without downloading weights.
"""

from pathlib import Path

import torch

from serve_app.engine.checkpoint import save_once
from serve_app.engine.tiny import random_lora, save_kohya

TINY_NAME = "zimage-tiny-v2"

# A few sentences to train the byte-level BPE on; any fixed text gives a fixed tokenizer.
_CORPUS = [
    "a photo of a cat sitting on a windowsill in the morning light",
    "an oil painting of a lighthouse on a cliff during a storm, dramatic sky",
    "a watercolor illustration of a fox in a snowy forest, soft colors",
    "portrait of an old sailor with a white beard, studio lighting, 85mm",
    "a futuristic city skyline at night with neon signs and flying cars",
    "a bowl of ramen with egg and green onions, top view, food photography",
    "a red vintage steam train opening a zipper in the winter snow, poster",
    "mountains, river, trees, clouds, sunset, ocean, beach, desert, flowers",
]

# Same rendering as Qwen3's template for a user turn with add_generation_prompt=True.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def build_tokenizer(corpus: list[str] = _CORPUS, vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on `corpus`, with a Qwen3-style chat
    template (deterministic: the same corpus, the same tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_pipeline(text_hidden: int = 32, text_layers: int = 3):
    """Build the tiny Z-Image pipeline in memory (random weights, fixed seeds).

    Args:
        text_hidden: hidden size of the text encoder (and the transformer's caption input).
        text_layers: layers of the text encoder. Tests that need an encoder slow enough
            to be cancelled mid-stage build a wider, deeper one.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.transformers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 2,
            num_hidden_layers=text_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(1)
    transformer = ZImageTransformer2DModel(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=text_hidden,
        axes_dims=[8, 12, 12],
        axes_lens=[1536, 512, 512],
    )
    torch.manual_seed(2)
    vae = AutoencoderKL(**vae_config([8, 8, 16, 16], layers_per_block=1, norm_num_groups=8))
    return assemble(tokenizer, text_encoder, transformer, vae)


def vae_config(block_out_channels: list[int], layers_per_block: int, norm_num_groups: int):
    """Z-Image's 16-channel VAE (the Flux autoencoder's layout) at the given widths."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def assemble(tokenizer, text_encoder, transformer, vae):
    """A ZImagePipeline of these components and Z-Image-Turbo's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def ensure_tiny(root: Path, name: str = TINY_NAME, **sizes) -> Path:
    """Return the checkpoint folder `root/name`, generating it if it is missing.

    `sizes` go to build_tiny_pipeline; the default is the embedded `tiny`.
    """

    def save(folder: Path) -> None:
        pipe = build_tiny_pipeline(**sizes)
        pipe.save_pretrained(folder, safe_serialization=True)
        save_tiny_loras(folder / "loras", pipe.transformer)

    return save_once(root / name, save)


# The generated adapters: attention only (diffusers' format, with PEFT's config), and
# feed-forward with alpha half the rank (kohya's format).
ATTENTION = r"(layers|noise_refiner)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)"
FEED_FORWARD = r"layers\.\d+\.feed_forward\.w[123]"


def save_tiny_loras(folder: Path, transformer) -> None:
    """tiny-style.safetensors (diffusers) and tiny-kohya.safetensors (kohya) in `folder`."""
    from diffusers.loaders import ZImageLoraLoaderMixin

    folder.mkdir(parents=True, exist_ok=True)
    state, config = random_lora(transformer, ATTENTION, rank=4, alpha=4, seed=10)
    ZImageLoraLoaderMixin.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        weight_name="tiny-style.safetensors",
        transformer_lora_adapter_metadata=config,
    )
    state, _ = random_lora(transformer, FEED_FORWARD, rank=4, alpha=2, seed=11)
    save_kohya(folder / "tiny-kohya", state, alpha=2)
