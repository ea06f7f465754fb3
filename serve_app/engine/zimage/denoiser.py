"""Z-Image's denoiser: ZImageTransformer2DModel through a flow-match Euler loop, then the
16-channel VAE. For the same seed, prompt and settings it gives the stock ZImagePipeline's
pixels; tests/engine/zimage/test_equivalence.py holds it to that."""

from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.loaders import ZImageLoraLoaderMixin
from diffusers.models.transformers import ZImageTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from pydantic import BaseModel, ConfigDict

from serve_app.engine.denoiser import Denoiser, LoraOptions
from serve_app.engine.lora import LoraFamily
from serve_app.engine.precision import quantize_fp8
from serve_app.engine.split_guidance import SplitGuidance, second_device
from serve_app.engine.zimage.encoder import uses_guidance
from serve_app.engine.zimage.transformer import forward, invariants, prepare_transformer
from serve_app.messages import GenerationParams

# Named settings a request can start from; its own fields override them.
PRESETS = {
    "turbo": {"width": 1024, "height": 1024, "num_inference_steps": 9, "guidance_scale": 0.0},
}
DEFAULT_PRESET = "turbo"

LORA = LoraFamily(
    loader=ZImageLoraLoaderMixin,
    prefix="transformer",
    # Attention and feed-forward of every block, and the blocks' modulation.
    targets=(
        r"(layers|noise_refiner|context_refiner)\.\d+\."
        r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
    ),
)
# What `precision: fp8` runs in float8: the linear layers of the 30 main blocks' attention
# and feed-forward, nearly all of a step's FLOPs. The embedders, the caption and noise
# refiners, every block's modulation (adaLN) and the final layer stay in the model's
# dtype: they are small, and the step's output is most sensitive to them.
FP8_TARGETS = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"
# Padded caption lengths (Z-Image pads captions to multiples of 32) whose steps the
# warm-up captures in CUDA graphs, at each warm-up size: prompts up to 128 tokens after
# the chat template (about 100 words). Longer prompts run the compiled step unreplayed.
GRAPH_CAPTION_TOKENS = (32, 64, 96, 128)


class Options(BaseModel):
    """Z-Image settings (a model's `options` in deploy/*.yaml).

    Args:
        precision: "default" (the model's dtype) or "fp8": the main blocks' linear
            layers (FP8_TARGETS) in float8 with rowwise scales, activations quantised
            as they come (torchao, `pip install '.[quant]'`; NVIDIA compute capability
            8.9 or newer). Half the transformer's weight memory and faster steps, at a
            numeric cost the README's performance section reports; never the default.
            Not with LoRA adapters (they merge into the weights).
        cuda_graphs: replay a step without guidance from a CUDA graph, one per
            warm-up size and padded caption length (GRAPH_CAPTION_TOKENS), captured
            during the warm-up; other steps run as called. On CUDA only. Off by default
            until a GPU run has measured it (`make bench` turns it on: --graphs).
        fuse_projections: one GEMM for each attention's q, k, v projections and one for
            each feed-forward's w1, w3; same math, same weight memory. Measured no faster
            (*levers-3*); not with LoRA, whose adapters sit on the separate layers.
        split_guidance: run a guided step's conditional and unconditional passes at
            once, on the replica's card and on a second copy of the transformer on a
            second card (serve_app/engine/split_guidance.py; the VAE stays on the
            first). On CUDA the replica needs two cards (its Denoiser's `num_gpus: 2`;
            deploy.check holds a config to that); on a CPU the copy is a second CPU one.
            Steps without guidance are unchanged. Not with LoRA adapters (they apply to
            the first copy only). Unmeasured so far: `python -m
            load_tests.bench_multi_gpu --split-guidance`.
    """

    model_config = ConfigDict(extra="forbid")

    precision: Literal["default", "fp8"] = "default"
    cuda_graphs: bool = False
    fuse_projections: bool = False
    split_guidance: bool = False


class ZImageDenoiser(Denoiser):
    """Args: see Denoiser; `scheduler_config` is the FlowMatchEulerDiscreteScheduler's
    config, from which each call builds its own scheduler."""

    family = "zimage"
    lora_family = LORA
    presets = PRESETS
    default_preset = DEFAULT_PRESET
    split: SplitGuidance | None = None  # the second copy, with options.split_guidance

    @property
    def transformer(self):
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
    ) -> "ZImageDenoiser":
        """Load from a diffusers-format folder (model_index.json, transformer/, vae/,
        scheduler/).

        Args:
            device: where to run.
            dtype: weights and compute dtype of both models.
            attention_backend: a diffusers attention backend name; "native" is SDPA.
            compile: see Denoiser.attach.
            options: Z-Image settings.
            lora: LoRA slots to carry, or None for a model without adapters.
        """
        options = options or Options()
        if options.fuse_projections and lora is not None:
            raise ValueError("fuse_projections and LoRA adapters exclude each other")
        fp8 = options.precision == "fp8"
        if fp8 and (lora is not None or options.fuse_projections):
            raise ValueError(
                "precision fp8 excludes LoRA adapters (they merge into the weights, which "
                "are float8) and fuse_projections: set lora_dir: null for this model"
            )
        if options.split_guidance and lora is not None:
            raise ValueError(
                "split_guidance excludes LoRA adapters (they would apply to one of the "
                "transformer's two copies): set lora_dir: null for this model"
            )
        second = second_device(device) if options.split_guidance else None

        def load_transformer(on: torch.device):
            transformer = ZImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype, local_files_only=True
            )
            prepare_transformer(transformer, attention_backend, options.fuse_projections)
            if fp8:  # before compiling: the float8 layers compile as they run
                quantize_fp8(transformer, FP8_TARGETS, on)
            return transformer

        transformer = load_transformer(device)
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, local_files_only=True
        )
        slots = cls.attach(transformer, vae, LORA.targets, compile, lora)
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
        den = cls(transformer, vae, scheduler_config, device, slots)
        den.use_graphs(options.cuda_graphs)
        if second is not None:  # read again, so that fp8 quantises it on its own card
            den.split = SplitGuidance(load_transformer(second), second, compile)
        return den

    @property
    def side_multiple(self) -> int:
        # Latents are 1/8 of the image and the transformer patches them 2x2.
        return self.vae_scale_factor * 2

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor

    def warmup_calls(self, width: int, height: int):
        """Every path a request can take: no guidance; guidance with a negative prompt as
        long as the prompt (no attention mask); and with one of another padded length
        (masked). An H200 run that warmed only the first two took 4.6 s for its first
        masked request at 768x768 and 10 steps, against 1.2 s once warm (*sweep-cancel*,
        *-2*)."""
        hidden = self.transformer.config.cap_feat_dim
        dtype = self.transformer.dtype

        def tokens(n: int) -> torch.Tensor:
            return torch.zeros(n, hidden, dtype=dtype)

        paths = [  # (guidance, prompt tokens, negative tokens); padded to 32s: 64/64, 64/32
            (0.0, 40, None),
            (1.0, 40, 40),
            (1.0, 40, 8),
        ]
        if self.graphs is not None:  # a graph per padded caption length (40 is 64's)
            paths += [(0.0, n - 8, None) for n in GRAPH_CAPTION_TOKENS if n != 64]
        calls = []
        for guidance, n_prompt, n_negative in paths:
            embeddings = {"prompt": tokens(n_prompt)}
            if n_negative is not None:
                embeddings["negative"] = tokens(n_negative)
            calls.append(
                (GenerationParams("warmup", None, width, height, 1, guidance, 0), embeddings)
            )
        return calls

    def sampling(self, params, embeddings, sigmas: list[float] | None = None) -> "ZImageSampling":
        """Phases 1-3 of ZImagePipeline.__call__ for one request.

        Args:
            sigmas: a custom noise schedule (as the stock pipeline's `sigmas`).
        """
        return ZImageSampling(self, params, embeddings, sigmas)

    def _step(self, s: "ZImageSampling", i: int) -> torch.Tensor:
        n, params = s.num_images, s.params
        timestep = (1000 - s.timesteps[i].expand(n)) / 1000
        model_input = s.latents.to(self.transformer.dtype)
        if not uses_guidance(params):
            noise_pred = self._graphed_forward(model_input, timestep, s.cap_feats, s.cache)
        elif self.split is None:
            # One batch of 2, not graphed: the graphs' pool stays at batch 1's size.
            out = _forward(
                self.transformer, model_input.repeat(2, 1, 1, 1), timestep.repeat(2),
                s.cap_feats, s.cache,
            )  # fmt: skip
            noise_pred = _guided(out[:n], out[n:], params.guidance_scale)
        else:
            pos, neg = self.split.run(
                lambda: _forward(self.transformer, model_input, timestep, s.cap_feats, s.cache),
                lambda x, t: _forward(self.split.model, x, t, s.negative_feats, s.negative_cache),
                model_input,
                timestep,
            )
            noise_pred = _guided(pos, neg, params.guidance_scale)
        # The model predicts the negated velocity; Euler step x += (sigma_next - sigma) * v.
        noise_pred = -noise_pred.float().squeeze(2)
        return s.latents + (s.sigmas[i + 1] - s.sigmas[i]) * noise_pred

    def _graphed_forward(self, model_input, timestep, cap_feats, cache) -> torch.Tensor:
        """A step's forward without guidance, replayed from its CUDA graph where the
        warm-up captured one (see Denoiser.graphed)."""
        if not cache:
            cache.update(invariants(self.transformer, list(model_input.unsqueeze(2)), cap_feats))
        # The cache's tensors are inputs of a graph (copied in at each replay); its other
        # entries are lengths, the same for every request of these shapes and lengths.
        tensors = {k: v for k, v in cache.items() if isinstance(v, torch.Tensor)}

        def transformer(model_input, timestep, *values):
            step_cache = {**cache, **dict(zip(tensors, values, strict=True))}
            return _forward(self.transformer, model_input, timestep, cap_feats, step_cache)

        key = f"transformer:{cache['cap_seqlens']}"
        return self.graphed(key, transformer, model_input, timestep, *tensors.values())


def _forward(transformer, model_input, timestep, cap_feats, cache) -> torch.Tensor:
    """transformer.forward on a batch [images, channels, h, w] (one caption each)."""
    images = list(model_input.unsqueeze(2).unbind(dim=0))
    return torch.stack(forward(transformer, images, timestep, cap_feats, cache))


def _guided(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance's prediction from the conditional and unconditional ones."""
    pos, neg = pos.float(), neg.float()
    return pos + scale * (pos - neg)


class ZImageSampling:
    """One request's latents, timesteps and prompt features on the device."""

    def __init__(self, den: ZImageDenoiser, params: GenerationParams, embeddings, sigmas):
        self.den, self.params, self.num_images = den, params, params.num_images
        device, dtype = den.device, den.transformer.dtype
        steps = params.num_inference_steps

        # 1. Prompt embeddings, one per image (and the negatives after them, for guidance;
        #    with split guidance, the negatives on the second copy's device apart)
        prompt = embeddings["prompt"].to(device, dtype=dtype)
        self.cap_feats = [prompt] * params.num_images
        if uses_guidance(params) and den.split is not None:
            negative = embeddings["negative"].to(den.split.device, dtype=dtype)
            self.negative_feats = [negative] * params.num_images
            self.negative_cache: dict = {}  # the second pass's own; see transformer.forward
        elif uses_guidance(params):
            negative = embeddings["negative"].to(device, dtype=dtype)
            self.cap_feats = self.cap_feats + [negative] * params.num_images

        # 2. Initial noise: drawn on the CPU from the seed, so a seed means the same image
        #    on every device (as the stock pipeline with a CPU generator).
        latent_h = 2 * (params.height // (den.vae_scale_factor * 2))
        latent_w = 2 * (params.width // (den.vae_scale_factor * 2))
        generator = torch.Generator("cpu").manual_seed(params.seed)
        self.latents = randn_tensor(
            (params.num_images, den.transformer.in_channels, latent_h, latent_w),
            generator=generator,
            device=device,
            dtype=torch.float32,
        )

        # 3. Timesteps, from a scheduler that belongs to this call alone
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(den.scheduler_config)
        image_seq_len = (latent_h // 2) * (latent_w // 2)
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        if sigmas is None:
            sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        self.timesteps = scheduler.timesteps
        self.sigmas = scheduler.sigmas
        self.sigma_values = scheduler.sigmas.tolist()  # one host copy, not one sync a step
        self.num_steps = len(self.timesteps)
        self.cache: dict = {}  # what every step's forward shares; see transformer.forward

    def skips(self, i: int) -> bool:
        # dt == 0: the forward could not change the latents (the stock loop runs it).
        return self.sigma_values[i + 1] == self.sigma_values[i]

    def step(self, i: int) -> None:
        self.latents = self.den._step(self, i)

    def decode(self, k: int) -> torch.Tensor:
        return self.den.vae.decode(self.den.to_vae(self.latents[k : k + 1]), return_dict=False)[0]
