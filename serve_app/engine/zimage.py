"""Z-Image family: Qwen3 text encoder -> ZImageTransformer2DModel loop -> 16-channel VAE.

The encoder and the denoiser are separate objects because they run in separate replicas
(a fraction of a GPU for the encoder, a whole one for the denoiser). The step loop is
ours rather than `ZImagePipeline.__call__`: a pipeline object shares its scheduler state
and `_interrupt` flag between concurrent calls, and the service needs per-step control
(cancel, timing). For the same seed, prompt and settings it gives the stock pipeline's
pixels; tests/engine/test_equivalence.py holds it to that.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import (
    SEQ_MULTI_OF,
    FeedForward,
    ZSingleStreamAttnProcessor,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModel, AutoTokenizer

from serve_app.engine.cancel import CancelToken
from serve_app.engine.stages import StageRecorder
from serve_app.errors import Cancelled, DoesNotFit, PromptTooLong
from serve_app.messages import GenerationParams

FAMILY = "zimage"
PATCH, F_PATCH = 2, 1  # the transformer's spatial and temporal patch sizes
# The stock pipeline's max_sequence_length. Longer prompts are refused, not truncated.
MAX_PROMPT_TOKENS = 512
# Named settings a request can start from; its own fields override them.
PRESETS = {
    "turbo": {"width": 1024, "height": 1024, "num_inference_steps": 9, "guidance_scale": 0.0},
}
DEFAULT_PRESET = "turbo"


@dataclass
class PromptEmbeddings:
    """Text-encoder output for one request, at the prompt's real length (no padding).

    Args:
        prompt: [tokens, hidden] hidden states of the prompt.
        negative: the same for the negative prompt, or None when guidance is off.
    """

    prompt: torch.Tensor
    negative: torch.Tensor | None

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray | None, str]:
        """(prompt, negative, dtype name) as numpy arrays of the tensors' raw bits."""
        dtype = str(self.prompt.dtype).removeprefix("torch.")
        return _bits(self.prompt), None if self.negative is None else _bits(self.negative), dtype

    @classmethod
    def from_arrays(
        cls, prompt: np.ndarray, negative: np.ndarray | None, dtype: str
    ) -> "PromptEmbeddings":
        return cls(_unbits(prompt, dtype), None if negative is None else _unbits(negative, dtype))


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _unbits(a: np.ndarray, dtype: str) -> torch.Tensor:
    # A copy: arrays that arrive through Ray's object store are read-only.
    t = torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def chat_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the stock pipeline renders it: one user turn, generation
    prompt, thinking on."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    return tokenizer(rendered, add_special_tokens=True)["input_ids"]


# Called with (stage, steps_done, steps_total) after each step and when decoding starts.
ProgressFn = Callable[[str, int, int], None]


class ZImageEncoder:
    """Prompt -> Qwen3 `hidden_states[-2]` at the prompt's real length.

    Args:
        tokenizer: the checkpoint's tokenizer, with its chat template.
        text_encoder: a Qwen3 model.
        device: where the text encoder runs.
        max_tokens: longest accepted prompt, chat template included.
        cuda_graphs: replay the forward from CUDA graphs, one per (batch, length bucket),
            captured on first use (see `warmup`). A short prompt's forward is bound by
            kernel launches, not by arithmetic: on an H200 the 4B encoder took 31-37 ms
            eagerly for 65 tokens (*levers-1*, *levers-2*), 9 ms replayed (*bench-6*).
            Default: on CUDA.
    """

    family = FAMILY
    # Sequence lengths a graph is captured for; a prompt is padded up to the next one.
    GRAPH_LENGTHS = (64, 128, 256, 512)

    def __init__(
        self,
        tokenizer,
        text_encoder,
        device: torch.device,
        max_tokens=MAX_PROMPT_TOKENS,
        cuda_graphs: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.device = device
        self.max_tokens = max_tokens
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_pool = None
        self._side_stream = None

    @classmethod
    def from_pretrained(
        cls, path: Path, device: torch.device, dtype: torch.dtype, compile: bool = False
    ) -> "ZImageEncoder":
        """Load the tokenizer and text encoder from a diffusers-format folder.

        Args:
            compile: torch.compile the text encoder (dynamic shapes). On an H200 it cut
                a 65-token eager forward from 30.8 to 12.4 ms (*levers-2*); the first call
                compiles, see `warmup`.
        """
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder = AutoModel.from_pretrained(
            path / "text_encoder", dtype=dtype, local_files_only=True
        )
        if compile:
            text_encoder.compile(dynamic=True)
        return cls(tokenizer, text_encoder, device)

    def warmup(self) -> float:
        """Encode a prompt alone and with a negative prompt (the two batch shapes) and, on
        CUDA, capture every graph, so that no request pays for compilation or capture.
        Returns the seconds taken."""
        start = time.perf_counter()
        self.encode("warm-up prompt", None, with_negative=False)
        self.encode("warm-up prompt", "warm-up negative", with_negative=True)
        if self.cuda_graphs:
            for batch in (1, 2):
                for length in self.GRAPH_LENGTHS:
                    self._graph(batch, length)
        return round(time.perf_counter() - start, 3)

    def token_ids(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text` after the chat template; raises PromptTooLong past the limit."""
        ids = chat_token_ids(self.tokenizer, text)
        if len(ids) > self.max_tokens:
            raise PromptTooLong(param, len(ids), self.max_tokens)
        return ids

    @torch.no_grad()
    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        with_negative: bool,
        cancel: CancelToken | None = None,
    ) -> PromptEmbeddings:
        """Encode a prompt (and, for guidance, the negative prompt; "" if None).

        Both go through one forward, right-padded to the longer one. The model is causal,
        so right padding leaves every real token's hidden state as it would be alone.
        Returned tensors are on the CPU, ready to cross to the denoiser's process.
        """
        texts = [("prompt", prompt)]
        if with_negative:
            texts.append(("negative_prompt", negative_prompt or ""))
        ids = [self.token_ids(text, param) for param, text in texts]
        if cancel is not None:
            cancel.check("encode")
        longest = max(len(i) for i in ids)
        if self.cuda_graphs:
            length = next(n for n in self.GRAPH_LENGTHS if n >= longest)
            graph, static_ids, static_out = self._graph(len(ids), length)
            static_ids.copy_(self._padded(ids, length))
            graph.replay()
            hidden = static_out
        else:
            mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
            hidden = self._forward(self._padded(ids, longest), mask.to(self.device))
        embeds = [hidden[row, : len(i)].to("cpu") for row, i in enumerate(ids)]
        return PromptEmbeddings(prompt=embeds[0], negative=embeds[1] if with_negative else None)

    def _padded(self, ids: list[list[int]], length: int) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id
        return torch.tensor([i + [pad] * (length - len(i)) for i in ids], device=self.device)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_encoder(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states[-2]

    def _causal_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`hidden_states[-2]` without a padding mask and without the layers it does not
        need: the last layer (whose output, like every other layer's, output_hidden_states
        would also keep) and the final norm. The model is causal and the padding comes
        after every real token, so no real token attends to it, as with the mask."""
        model = self.text_encoder
        hidden = model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rotary = model.rotary_emb(hidden, positions)
        for layer in model.layers[: model.config.num_hidden_layers - 1]:
            hidden = layer(hidden, position_ids=positions, position_embeddings=rotary)
        return hidden

    def _graph(self, batch: int, length: int) -> tuple:
        """The CUDA graph of a (batch, length) `_causal_forward`, captured on first use.
        A fixed shape with no mask has no data-dependent branch, which a capture needs."""
        if (batch, length) not in self._graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
                # One side stream for every warm-up: cuBLAS keeps a workspace (32 MiB on
                # Hopper) per stream it has run on, for the life of the process.
                self._side_stream = torch.cuda.Stream(self.device)
            static_ids = torch.full(
                (batch, length), self.tokenizer.pad_token_id, device=self.device
            )
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up runs before capture, per CUDA's recipe
                for _ in range(2):
                    self._causal_forward(static_ids)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_out = self._causal_forward(static_ids)
            self._graphs[batch, length] = (graph, static_ids, static_out)
        return self._graphs[batch, length]


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


def prepare_transformer(
    transformer, attention_backend: str = "native", compile: bool = False, fuse: bool = False
):
    """Our changes to a loaded ZImageTransformer2DModel, in place: real-valued RoPE
    attention, fused projections if `fuse`, the attention backend, and regional
    compilation."""
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), ZSingleStreamAttnProcessor):
            module.set_processor(RealRopeAttnProcessor())
    transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    if fuse:
        fuse_projections(transformer)
    if attention_backend != "native":
        transformer.set_attention_backend(attention_backend)
    if compile:
        configure_dynamo()
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    return transformer


# Graphs one compiled code object may keep. All transformer blocks share one forward (the
# main layers and both refiners, with and without modulation), compiled for batch 1 and
# 2, with and without an attention mask: 8 graphs after the warm-up, Dynamo's default
# limit, past which a `fullgraph=True` call fails.
RECOMPILE_LIMIT = 64


def configure_dynamo() -> None:
    """Process-wide Dynamo settings for our compiled regions; call before compiling.

    Duck sizing off: with it, a dimension that happens to equal another at compile time
    (a prompt padded to 64 tokens and the 64 rotary pairs of a head) shares its symbol,
    which the static one then pins; the next prompt length recompiles. An H200 run
    failed that way on its first guidance request after the warm-up had used all eight
    graphs; tests/engine/test_zimage.py checks that no request recompiles.
    """
    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """The VAE's [1, 3, H, W] output in [-1, 1] as HxWx3 uint8, as the stock pipeline
    rounds it. Contiguous (made so on the device, where it is cheap): elementwise ops keep
    the permuted strides, and PNG-encoding that planar layout took 5.1-5.3 against 2.2 ms
    at 1024x1024 (dev machine), and pickling it a gather."""
    image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (image * 255).round().to(torch.uint8)[0].contiguous()


class ZImageDenoiser:
    """Embeddings -> latents through our own flow-match Euler loop -> VAE decode -> pixels.

    All state of a call is local to that call; one object serves requests one after
    another (the deployment runs it on a single worker thread).

    Args:
        transformer: the ZImageTransformer2DModel.
        vae: the 16-channel AutoencoderKL.
        scheduler_config: FlowMatchEulerDiscreteScheduler config; each call builds its own.
        device: where both models run.
    """

    family = FAMILY
    presets = PRESETS
    default_preset = DEFAULT_PRESET

    def __init__(self, transformer, vae, scheduler_config: dict, device: torch.device):
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.scheduler_config = scheduler_config
        self.device = device
        # Tell `progress` of a step once the next step's work is queued on the device, not
        # at the step boundary: the listener (the replica's event loop) then takes the GIL
        # while the device is busy, instead of delaying the next launches while it sits
        # idle. On a CPU, work runs as it is called; there a report is told at once.
        self.progress_when_queued = device.type == "cuda"
        # The stock pipeline's vae_scale_factor (8 for 4 blocks); latents are 1/8 of the
        # image and the transformer patches them 2x2, so sides must be multiples of 16.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str = "native",
        compile: bool = False,
        fuse_projections: bool = False,
    ) -> "ZImageDenoiser":
        """Load from a diffusers-format folder.

        Args:
            path: the folder (model_index.json, transformer/, vae/, scheduler/).
            device: where to run.
            dtype: weights and compute dtype of both models.
            attention_backend: a diffusers attention backend name; "native" is SDPA.
            compile: torch.compile the transformer's repeated blocks (regional
                compilation) and the VAE decoder, with dynamic shapes: one compilation
                serves every size, prompt length and batch. The first call compiles;
                see `warmup`.
            fuse_projections: one GEMM for each attention's q, k and v and one for each
                feed-forward's w1 and w3 (see `fuse_projections`). LoRA adapters on those
                layers would not apply to the fused ones.
        """
        transformer = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
        prepare_transformer(transformer, attention_backend, compile, fuse_projections)
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, local_files_only=True
        )
        if compile:  # prepare_transformer has configured Dynamo
            vae.decoder.compile(dynamic=True)
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
        return cls(transformer, vae, scheduler_config, device)

    def warmup(self, sizes: list[tuple[int, int]]) -> dict[str, float]:
        """Run a one-step generation per (width, height) along every path a request can
        take, so that compilation, kernel selection and allocator growth happen before
        the first request: no guidance; guidance with a negative prompt as long as the
        prompt (no attention mask); and with one of another padded length (masked). An
        H200 run that warmed only the first two took 4.6 s for its first masked request
        at 768x768 and 10 steps, against 1.2 s once warm (*sweep-cancel*, *-2*).
        Returns the seconds each size took."""
        hidden = self.transformer.config.cap_feat_dim
        dtype = self.transformer.dtype

        def tokens(n: int) -> torch.Tensor:
            return torch.zeros(n, hidden, dtype=dtype)

        paths = [  # (guidance, prompt tokens, negative tokens); padded to 32s: 64/64, 64/32
            (0.0, 40, None),
            (1.0, 40, 40),
            (1.0, 40, 8),
        ]
        took = {}
        for width, height in sizes:
            start = time.perf_counter()
            for guidance, n_prompt, n_negative in paths:
                negative = None if n_negative is None else tokens(n_negative)
                params = GenerationParams("warmup", None, width, height, 1, guidance, 0)
                self.generate(params, PromptEmbeddings(tokens(n_prompt), negative))
            took[f"{width}x{height}"] = round(time.perf_counter() - start, 3)
        return took

    @property
    def side_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def generate(
        self,
        params: GenerationParams,
        embeddings: PromptEmbeddings,
        cancel: CancelToken | None = None,
        recorder: StageRecorder | None = None,
        sigmas: list[float] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[np.ndarray]:
        """Draw `params.num_images` images; returns HxWx3 uint8 arrays.

        Args:
            params: what to draw.
            embeddings: the encoder's output for `params`.
            cancel: checked before every step and every image decode.
            recorder: receives the "denoise" and "decode" stages and each step's time.
            sigmas: a custom noise schedule (as the stock pipeline's `sigmas`).
            progress: told of each finished step and of the start of decoding.

        Raises:
            Cancelled: `cancel` was set; the loop stopped at the next step boundary.
            DoesNotFit: the device ran out of memory; nothing of the call stays allocated.
        """
        cancel = cancel or CancelToken()
        recorder = recorder or StageRecorder(self.device)
        try:
            return self._generate(params, embeddings, cancel, recorder, sigmas, progress)
        except Cancelled as exc:
            stopped = exc.args
        except torch.OutOfMemoryError:
            stage = next(
                (name for name, rec in recorder.stages.items() if rec.outcome == "error"), "denoise"
            )
            stopped = None
        # Re-raised outside the except block: the traceback of the original exception holds
        # the loop's frames, and with them the latents and activations of this call.
        if stopped is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DoesNotFit(params.width, params.height, params.num_images, stage)
        raise Cancelled(*stopped)

    @torch.no_grad()
    def _generate(self, params, embeddings, cancel, recorder, sigmas, progress):
        progress = progress or (lambda *_: None)
        steps = params.num_inference_steps
        cancel.check("queued", 0, steps)
        dtype = self.transformer.dtype

        # 1. Prompt embeddings, one per image (and the negatives after them, for guidance)
        prompt = embeddings.prompt.to(self.device, dtype=dtype)
        cap_feats = [prompt] * params.num_images
        if params.uses_guidance:
            negative = embeddings.negative.to(self.device, dtype=dtype)
            cap_feats = cap_feats + [negative] * params.num_images

        # 2. Initial noise: drawn on the CPU from the seed, so a seed means the same image
        #    on every device (as the stock pipeline with a CPU generator).
        latent_h = 2 * (params.height // (self.vae_scale_factor * 2))
        latent_w = 2 * (params.width // (self.vae_scale_factor * 2))
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = randn_tensor(
            (params.num_images, self.transformer.in_channels, latent_h, latent_w),
            generator=generator,
            device=self.device,
            dtype=torch.float32,
        )

        # 3. Timesteps, from a scheduler that belongs to this call alone
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
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
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        timesteps = scheduler.timesteps
        sigma_values = scheduler.sigmas.tolist()  # one host copy, not one sync per step
        steps = len(timesteps)

        told: list[tuple[str, int, int]] = []

        def tell(stage: str, done: int) -> None:
            told.append((stage, done, steps))
            if not self.progress_when_queued:
                flush()

        def flush() -> None:
            for report in told:
                progress(*report)
            told.clear()

        # 4. Denoising loop
        cache: dict = {}  # what every step's forward shares; see _forward
        with recorder.stage("denoise"):
            for i, t in enumerate(timesteps):
                cancel.check("denoise", i, steps)
                if sigma_values[i + 1] == sigma_values[i]:
                    continue  # dt == 0: the forward could not change the latents
                with recorder.step():
                    latents = self._step(latents, t, scheduler.sigmas, i, cap_feats, params, cache)
                    flush()  # the previous step's report, while this step runs
                tell("denoise", i + 1)

        # 5. Decode, one image at a time: the VAE's activations dominate peak memory
        images = []
        tell("decode", steps)
        with recorder.stage("decode"):
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            latents = latents + self.vae.config.shift_factor
            for k in range(params.num_images):
                cancel.check("decode", steps, steps)
                pixels = to_pixels(self.vae.decode(latents[k : k + 1], return_dict=False)[0])
                flush()
                images.append(pixels.cpu().numpy())
        return images

    def _forward(self, x: list, t: torch.Tensor, cap_feats: list, cache: dict) -> list:
        """ZImageTransformer2DModel.forward (basic mode, patch 2x2), with what does not
        depend on the latents or the timestep computed once per request and kept in
        `cache`: the caption's embedding and refiner blocks, position ids, rotary tables,
        padding and attention masks. The stock forward recomputes them every step: about
        a hundred small kernels and their Python, with the device idle after each step's
        sync (an H200 at 768x768: 57 ms a step for 51 ms of kernels, *step-idle-probe*).
        Same math:
        tests/engine/test_equivalence.py holds the pixels to the stock pipeline's."""
        tr = self.transformer
        if not cache:
            cache.update(self._invariants(x, cap_feats))
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

    def _invariants(self, x: list, cap_feats: list) -> dict:
        """The part of the transformer's forward that is the same at every step of a
        request, as the stock forward computes it (patchify_and_embed, _prepare_sequence,
        the caption refiner, _build_unified_sequence)."""
        tr, device = self.transformer, x[0].device
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

    def _step(self, latents, t, sigmas, i, cap_feats, params, cache) -> torch.Tensor:
        n = params.num_images
        timestep = (1000 - t.expand(n)) / 1000
        model_input = latents.to(self.transformer.dtype)
        if params.uses_guidance:
            model_input = model_input.repeat(2, 1, 1, 1)
            timestep = timestep.repeat(2)
        out = self._forward(
            list(model_input.unsqueeze(2).unbind(dim=0)), timestep, cap_feats, cache
        )
        if params.uses_guidance:
            pos = torch.stack([o.float() for o in out[:n]])
            neg = torch.stack([o.float() for o in out[n:]])
            noise_pred = pos + params.guidance_scale * (pos - neg)
        else:
            noise_pred = torch.stack([o.float() for o in out])
        # The model predicts the negated velocity; Euler step x += (sigma_next - sigma) * v.
        noise_pred = -noise_pred.squeeze(2)
        return latents + (sigmas[i + 1] - sigmas[i]) * noise_pred
