"""SDXL's denoiser: UNet2DConditionModel through an EulerAncestral loop with classifier-
free guidance in one batched UNet call, then the 4-channel VAE. For the same seed,
prompt and settings it gives the stock StableDiffusionXLPipeline's pixels (with the
EulerAncestral scheduler); tests/engine/sdxl/test_equivalence.py holds it to that."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from pydantic import BaseModel, ConfigDict

from serve_app.engine.denoiser import Denoiser, LoraOptions
from serve_app.engine.lora import LoraFamily
from serve_app.engine.sdxl.encoder import uses_guidance
from serve_app.messages import GenerationParams

# The engine this service replaces: 1024x1024, 25 steps, CFG 7, EulerAncestral, and its
# style adapter "niannian" at 0.85 (where a file of that name is in the LoRA folder).
PRESETS = {
    "niannian": {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 25,
        "guidance_scale": 7.0,
        "loras": [{"name": "niannian", "scale": 0.85}],
    },
}
DEFAULT_PRESET = "niannian"

LORA = LoraFamily(
    loader=StableDiffusionXLLoraLoaderMixin,
    prefix="unet",
    # What kohya's trainer adapts by default: every linear layer of the transformers.
    targets=(
        r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
        r"(proj_in|proj_out|transformer_blocks\.\d+\."
        r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    ),
)


class Options(BaseModel):
    """SDXL settings (a model's `options` in deploy/*.yaml)."""

    model_config = ConfigDict(extra="forbid")
    # Replay the UNet call and the VAE decode from CUDA graphs, one per shape the
    # warm-up runs (its sizes, one image, with and without guidance, LoRA slots off and
    # on); other shapes run as called. On CUDA only. An SDXL step is bound by the host
    # (an H200: the GPU busy 36.7 ms of an 87 ms step, *sdxl-step-probe*).
    cuda_graphs: bool = True


class SDXLDenoiser(Denoiser):
    """Args: see Denoiser; `scheduler_config` is the checkpoint's scheduler config, from
    which each call builds its own EulerAncestralDiscreteScheduler."""

    family = "sdxl"
    lora_family = LORA
    presets = PRESETS
    default_preset = DEFAULT_PRESET

    @property
    def unet(self):
        return self.model

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str = "native",
        compile: bool = False,
        options: Options | None = None,
        lora: LoraOptions | None = None,
    ) -> "SDXLDenoiser":
        """Load from a diffusers-format SDXL folder (model_index.json, unet/, vae/,
        scheduler/). The VAE decodes in float32 when `dtype` is float16: the stock
        SDXL VAE overflows in float16 (bfloat16 has float32's range)."""
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True
        )
        if attention_backend != "native":
            unet.set_attention_backend(attention_backend)
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True
        )
        slots = cls.attach(unet, vae, LORA.targets, compile, lora)
        scheduler_config = EulerAncestralDiscreteScheduler.load_config(path, subfolder="scheduler")
        den = cls(unet, vae, scheduler_config, device, slots)
        den.use_graphs((options or Options()).cuda_graphs)
        return den

    def unet_call(self, sample, t, embeds, text_embeds, time_ids) -> torch.Tensor:
        return self.unet(
            sample,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]

    def vae_call(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]

    @property
    def side_multiple(self) -> int:
        # The UNet halves the latents at each level but the last.
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = latents.to(vae.dtype)
        mean, std = (
            getattr(vae.config, "latents_mean", None),
            getattr(vae.config, "latents_std", None),
        )
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return latents * std / vae.config.scaling_factor + mean
        return latents / vae.config.scaling_factor

    def warmup_calls(self, width: int, height: int):
        """Without guidance (batch 1) and with it (batch 2)."""
        config, dtype = self.unet.config, self.unet.dtype
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        embeddings = {
            "prompt_embeds": torch.zeros(77, config.cross_attention_dim, dtype=dtype),
            "pooled": torch.zeros(pooled, dtype=dtype),
        }
        negatives = {
            "negative_prompt_embeds": embeddings["prompt_embeds"],
            "negative_pooled": embeddings["pooled"],
        }
        return [
            (GenerationParams("warmup", None, width, height, 1, 0.0, 0), embeddings),
            (GenerationParams("warmup", None, width, height, 1, 7.0, 0), embeddings | negatives),
        ]

    def sampling(self, params, embeddings) -> "SDXLSampling":
        """Phases 3-7 of StableDiffusionXLPipeline.__call__ for one request."""
        return SDXLSampling(self, params, embeddings)


class SDXLSampling:
    """One request's latents, scheduler, generator and conditioning on the device."""

    def __init__(self, den: SDXLDenoiser, params: GenerationParams, embeddings: dict):
        self.den, self.params, self.num_images = den, params, params.num_images
        device, dtype, n = den.device, den.unet.dtype, params.num_images
        self.guided = uses_guidance(params)

        # 3. Conditioning, one per image; with guidance the negatives come first
        def batch(name: str) -> torch.Tensor:
            t = embeddings[name].to(device, dtype=dtype)
            return t.unsqueeze(0).repeat(n, *[1] * t.ndim)

        embeds, pooled = batch("prompt_embeds"), batch("pooled")
        if self.guided:
            embeds = torch.cat([batch("negative_prompt_embeds"), embeds])
            pooled = torch.cat([batch("negative_pooled"), pooled])
        # Micro-conditioning: original size, crop top-left (0, 0), target size.
        size = [params.height, params.width]
        time_ids = torch.tensor([size + [0, 0] + size], dtype=dtype, device=device)
        self.embeds = embeds
        self.added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(embeds), 1)}

        # 4. Timesteps, from a scheduler that belongs to this call alone
        self.scheduler = EulerAncestralDiscreteScheduler.from_config(den.scheduler_config)
        self.scheduler.set_timesteps(params.num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        self.timesteps = self.scheduler.timesteps
        self.num_steps = len(self.timesteps)

        # 5. Initial noise, then each step's ancestral noise, from this request's own
        #    generator on the CPU: a seed means the same image on every device, and no
        #    other request draws from it.
        self.generator = torch.Generator("cpu").manual_seed(params.seed)
        shape = (
            n,
            den.unet.config.in_channels,
            params.height // den.vae_scale_factor,
            params.width // den.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=self.generator, device=device, dtype=dtype)
        self.latents = latents * self.scheduler.init_noise_sigma

    def skips(self, i: int) -> bool:
        return False

    def step(self, i: int) -> None:
        t, scheduler = self.timesteps[i], self.scheduler
        model_input = torch.cat([self.latents] * 2) if self.guided else self.latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = self.den.graphed(
            "unet",
            self.den.unet_call,
            model_input,
            t,
            self.embeds,
            self.added["text_embeds"],
            self.added["time_ids"],
        )
        if self.guided:
            uncond, text = noise.chunk(2)
            noise = uncond + self.params.guidance_scale * (text - uncond)
        self.latents = scheduler.step(
            noise, t, self.latents, generator=self.generator, return_dict=False
        )[0]

    def decode(self, k: int) -> torch.Tensor:
        latents = self.den.to_vae(self.latents[k : k + 1])
        return self.den.graphed("vae", self.den.vae_call, latents, slots=False)
