"""What every family's denoiser shares: adapters (LoRA), compilation, the warm-up over
the adapters' states, and `generate` through the shared loop. A family adds its
`sampling` (the phases of its pipeline's `__call__` up to the loop) and its warm-up
paths."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_app.engine import loop
from serve_app.engine.cancel import CancelToken
from serve_app.engine.compiling import compile_blocks
from serve_app.engine.graphs import CudaGraphs
from serve_app.engine.lora import Adapter, FusedLora, LoraFamily, LoraSlots, read_adapter
from serve_app.engine.stages import StageRecorder
from serve_app.messages import GenerationParams

LORA_MODES = ("fuse", "hotswap")


@dataclass(frozen=True)
class LoraOptions:
    """How a model applies adapters (see serve_app/engine/lora): `mode` "fuse" merges a
    request's adapters into the weights, "hotswap" runs them in LoRA slots; `slots`
    adapters one request may combine, `max_rank` the largest rank accepted.

    In "hotswap" each slot adds a rank-`max_rank` product to every adapted layer of a
    step that uses adapters (smaller ranks are zero-padded); requests without adapters
    skip them."""

    slots: int = 1
    max_rank: int = 64
    mode: str = "fuse"

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {self.mode!r}: one of {', '.join(LORA_MODES)}")


class Denoiser:
    """Embeddings -> latents through our own loop -> VAE decode -> pixels.

    All state of a call is local to that call; one object serves requests one after
    another (the deployment runs it on a single worker thread).

    Args:
        model: the family's transformer or UNet.
        vae: its AutoencoderKL.
        scheduler_config: the family's scheduler config; each call builds its own.
        device: where both models run.
        lora: where the model's adapters go (see `attach`), or None when it serves
            none.
    """

    family: str
    lora_family: LoraFamily
    presets: dict[str, dict]
    default_preset: str

    def __init__(
        self,
        model,
        vae,
        scheduler_config: dict,
        device: torch.device,
        lora: LoraSlots | FusedLora | None,
    ):
        began = time.perf_counter()
        self.model = model.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False)
        # Part of a replica's start-up (see the Denoiser deployment's `startup_s`).
        self.to_device_s = round(time.perf_counter() - began, 3)
        self.scheduler_config = scheduler_config
        self.device = device
        self.lora = lora
        if lora is not None:
            lora.to(device)
        # See loop.generate: on a GPU a step is reported once the next one is queued.
        self.progress_when_queued = device.type == "cuda"
        # The stock pipelines' vae_scale_factor (8 for 4 blocks).
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._preview_map: torch.Tensor | None = None  # see fit_preview
        # CUDA graphs of the calls a family routes through `graphed`; a family that
        # uses them sets this (see use_graphs).
        self.graphs: CudaGraphs | None = None
        self._capturing = False

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The weights this denoiser holds on its device."""
        return [self.model, self.vae]

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.vae_scale_factor

    def use_graphs(self, enabled: bool) -> None:
        """Replay the calls that go through `graphed` from CUDA graphs, captured by
        `warmup` for its shapes (on CUDA only; elsewhere nothing changes)."""
        self.graphs = CudaGraphs(self.device) if enabled and self.device.type == "cuda" else None

    def graphed(self, name: str, fn, *inputs: torch.Tensor, slots: bool = True) -> torch.Tensor:
        """`fn(*inputs)`, replayed from its CUDA graph where `warmup` captured one for
        these input shapes (and, for a call through the model, `slots`, the LoRA slots'
        state); run as called where not (another size, batch or device). The result may
        be a graph's own output tensor, which the next call of the same shapes
        overwrites: use it before that."""
        if self.graphs is None:
            return fn(*inputs)
        slots = slots and self.lora is not None and self.lora.enabled
        key = (name, *(tuple(x.shape) for x in inputs), slots)
        if key not in self.graphs:
            if not self._capturing:
                return fn(*inputs)
            self.graphs.capture(key, fn, *inputs)
        return self.graphs.replay(key, *inputs)

    @staticmethod
    def attach(model, vae, targets: str, compile: bool, lora: LoraOptions | None):
        """Where `model`'s adapters go, as `lora.mode` says: LoRA slots (made before
        compiling, as hot-swap needs) or merges into its layers. Then regional
        compilation of its repeated blocks and of the VAE decoder, with dynamic shapes:
        one compilation serves every size, prompt length and batch; the first calls
        compile (see `warmup`). Returns the slots or merges, or None without `lora`."""
        target = None
        if lora is not None and lora.mode == "hotswap":
            target = LoraSlots(model, targets, lora.slots, lora.max_rank)
        elif lora is not None:
            target = FusedLora(model, targets, lora.slots, lora.max_rank)
        if compile:
            compile_blocks(model)
            vae.decoder.compile(dynamic=True)
        return target

    def read_adapter(self, path: Path) -> Adapter:
        """Read and check an adapter file for this model; see lora.read_adapter."""
        if self.lora is None:
            raise ValueError("this model serves no adapters")
        return read_adapter(path, self.lora_family, self.lora, self.device, self.model.dtype)

    def generate(
        self,
        params: GenerationParams,
        embeddings: dict[str, torch.Tensor],
        cancel: CancelToken | None = None,
        recorder: StageRecorder | None = None,
        progress: loop.ProgressFn | None = None,
        loras: list[tuple[Adapter, float]] = (),
        on_preview: loop.PreviewFn | None = None,
        **sampling_kwargs,
    ) -> list[np.ndarray]:
        """Draw `params.num_images` images; returns HxWx3 uint8 arrays.

        Args:
            params: what to draw.
            embeddings: the family encoder's output for `params`.
            cancel, recorder, progress: see loop.generate.
            loras: (adapter, scale) pairs this call applies (at most `slots`).
            on_preview: told of `params.partial_images` previews of the first image.
            sampling_kwargs: family options of `sampling` (e.g. Z-Image's `sigmas`).

        Raises: see loop.generate.
        """
        loras = list(loras)
        if loras and self.lora is None:
            raise ValueError("this model serves no adapters")
        recorder = recorder or StageRecorder(self.device)

        def prepare() -> loop.Sampling:
            if self.lora is not None:
                # Its own stage: on a switch, a merge or a slot copy (see lora.activate).
                with recorder.stage("adapters"):
                    self.lora.activate(loras)
            return self.sampling(params, embeddings, **sampling_kwargs)

        return loop.generate(
            prepare,
            params,
            self.device,
            recorder,
            cancel,
            progress,
            self.progress_when_queued,
            self.preview,
            on_preview,
        )

    def sampling(self, params: GenerationParams, embeddings: dict, **kwargs) -> loop.Sampling:
        raise NotImplementedError

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the model's space as the VAE decoder takes them."""
        raise NotImplementedError

    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """The first image of `latents` as a cheap RGB preview (see preview_pixels)."""
        if self._preview_map is None:
            self._preview_map = self.fit_preview()
        return preview_pixels(latents, self._preview_map)

    def fit_preview(self) -> torch.Tensor:
        """This model's preview map (see fit_preview_map)."""
        channels = self.model.config.in_channels
        return fit_preview_map(self.vae, self.to_vae, channels, self.vae_scale_factor, self.device)

    def warmup(self, sizes: list[tuple[int, int]]) -> dict[str, float]:
        """Run `warmup_calls` for each (width, height), in each adapter state that has
        graphs of its own (hotswap: the slots off and on),
        so that compilation, kernel selection and allocator growth happen before the
        first request, then capture their CUDA graphs (see use_graphs). Returns the
        seconds each size took."""
        took = {}
        states = self.lora.warmup_states if self.lora is not None else [[]]
        for width, height in sizes:
            began = time.perf_counter()
            for loras in states:
                for params, embeddings in self.warmup_calls(width, height):
                    self.generate(params, embeddings, loras=loras)
                    if self.graphs is not None:  # compiled and warm: capture these shapes
                        self._capturing = True
                        try:
                            self.generate(params, embeddings, loras=loras)
                        finally:
                            self._capturing = False
            took[f"{width}x{height}"] = round(time.perf_counter() - began, 3)
        if self.lora is not None:
            self.lora.activate([])
        self._preview_map = self.fit_preview()  # here, not on a request's critical path
        if self.device.type == "cuda":
            # What the warm-up's largest sizes and compilation left cached, given back to
            # the card: requests grow the cache again to what they need, no more.
            torch.cuda.empty_cache()
        return took

    def warmup_calls(self, width: int, height: int) -> list[tuple[GenerationParams, dict]]:
        raise NotImplementedError


@torch.no_grad()
def preview_pixels(latents: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """The first image of `latents` [images, channels, h, w] as HxWx3 uint8 through a
    linear map of its channels (`weights`: [channels + 1, 3], the offset last), at the
    latents' resolution: a few small kernels where a VAE decode is hundreds."""
    weights = weights.to(latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), weights[:-1]) + weights[-1]
    return ((rgb * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def fit_preview_map(vae, to_vae, channels: int, scale: int, device) -> torch.Tensor:
    """The preview's map for a VAE: least squares of what it decodes from random latents
    (in the model's space, turned into the decoder's input by `to_vae`), each `scale` x
    `scale` pixel block averaged down to its latent. Fitted once per model, from the
    model's own VAE: no coefficients to ship or look up, for any family."""
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(4, channels, 16, 16, generator=generator).to(device)
    # Eager, where the decoder is compiled: requests decode one image at a time, and
    # dynamic shapes still specialise a batch of 1, so this batch of 4 compiled a graph
    # of its own that no request uses (41 s of an H100 replica's cold start, 14 s of a
    # warm one: *-perf-6*).
    with torch.compiler.set_stance("force_eager"):
        image = vae.decode(to_vae(latents), return_dict=False)[0].float()
    blocks = torch.nn.functional.avg_pool2d(image, scale)
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, channels).cpu()
    targets = blocks.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    return torch.linalg.lstsq(inputs, targets).solution
