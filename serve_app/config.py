"""Application settings: the `args` of deploy/serve_config.yaml, read once by the builder.

Unknown keys are errors, so a misspelt setting fails the deploy instead of being ignored.
Replica counts, GPUs and autoscaling are not here: they are Serve's own `deployments`
options in the same file, under each model's deployment names (`deployment_names`).
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.schema import MAX_LORAS, MAX_STEPS, LoraRef, split_size

MODEL_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Preset(BaseModel):
    """Named request settings a model offers; a request's own fields override them."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(ge=16)
    height: int = Field(ge=16)
    num_inference_steps: int = Field(ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(ge=0.0, le=20.0)
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)


class LoraSettings(BaseModel):
    """How a model's Denoiser replicas serve adapters.

    Args:
        mode: how adapters are applied (serve_app/engine/lora). "fuse" (the default):
            a request's adapters are merged into the weights; its steps cost what the
            base model's do, a change of adapters or scale costs a copy of the adapted
            weights back from the host and a merge (SDXL on an H200: README), and the
            host keeps a copy of those weights (SDXL's UNet: about 4 GiB of RAM per
            replica). "hotswap": adapters run in LoRA slots compiled into the model; a
            change costs a copy of the adapter's matrices, every step their products.
        slots: adapters one request may combine (1-3). With "hotswap" each adds a
            rank-`max_rank` product to every adapted layer of a step that uses adapters.
        max_rank: the largest adapter rank accepted; smaller ones are zero-padded.
        cache_size: adapters each Denoiser replica keeps resident (least recently used
            evicted first; never one a running or queued request uses). Also the
            replicas' multiplexing limit: requests go to a replica holding theirs.
        cache_bytes: device bytes the resident adapters may take at most.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["fuse", "hotswap"] = "fuse"
    slots: int = Field(1, ge=1, le=MAX_LORAS)
    max_rank: int = Field(64, ge=1, le=1024)
    cache_size: int = Field(8, ge=1)
    cache_bytes: int = Field(4 * 2**30, ge=0)


class MemorySettings(BaseModel):
    """A Denoiser replica's device-memory budget, which the ingress admits requests by.

    Args:
        budget_bytes: the budget itself; required on a CPU for admission by memory (none
            without it); on a GPU it overrides the measured one.
        fraction: cap this replica's process at this share of the card
            (torch.cuda.set_per_process_memory_fraction, before the model loads); null
            for no cap. With a cap, the budget is the cap; without, the card's memory
            this replica holds plus what is free when it is ready.
        cap_bytes: the same cap in bytes (the fraction is this over the card's total),
            so that a profile made for a smaller card holds on a larger one; not with
            `fraction`.
        encoder_cap_bytes: cap the model's PromptEncoder replicas likewise; null for none.
            The caps bound what PyTorch allocates, not a process's CUDA context (about
            0.5 GiB each, on the card too).
        reserve_bytes: kept free out of the budget (allocator rounding, other processes).
        unhealthy_after_ooms: consecutive out-of-memory failures after which the
            replica's health check fails, so that Ray replaces it.
    """

    model_config = ConfigDict(extra="forbid")

    budget_bytes: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0, le=1)
    cap_bytes: int | None = Field(None, gt=0)
    encoder_cap_bytes: int | None = Field(None, gt=0)
    reserve_bytes: int = Field(2**30, ge=0)
    unhealthy_after_ooms: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _one_cap(self) -> "MemorySettings":
        if self.fraction is not None and self.cap_bytes is not None:
            raise ValueError("memory: set fraction or cap_bytes, not both")
        return self


class ModelSettings(BaseModel):
    """One served model: what its replicas load and how.

    Args:
        id: the `model` a request names and GET /v1/models lists.
        model: "demo" (the shipped Z-Image demo model: it draws captioned shapes, see
            training/), "tiny" (embedded Z-Image) or "tiny-sdxl" (embedded SDXL), both
            generated on first use and drawing noise, or the path of a local
            diffusers-format folder, e.g. a download of Tongyi-MAI/Z-Image-Turbo, or
            the URI of one (file://, s3://, gs://), copied to local disk once per node
            and checked against its SHA256SUMS (serve_app/engine/fetch.py). Its family
            (zimage, sdxl) is read from the folder's model_index.json.
        device: "auto" (CUDA if present, else CPU), "cuda", "cuda:1" or "cpu".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32".
        attention_backend: diffusers attention backend of the denoiser: "native"
            (PyTorch SDPA), "flash", "_native_cudnn", "xformers", ...
        compile: torch.compile the denoiser's repeated blocks and the VAE decoder.
            "auto" (default): on CUDA only. Compiled once, with dynamic shapes, during
            the denoiser's warm-up; the README's performance section has what it buys.
        compile_cache_dir: where compiled graphs are kept, so that a replica started
            again (a restart, a scale-up on a node that compiled before, or any node
            when the folder is shared) loads them instead of compiling; "auto":
            `compile/` in the checkpoint cache ($T2I_CACHE, else ~/.cache/t2i); null:
            torch's default, under /tmp.
        warmup_sizes: image sizes ("WxH") the denoiser runs once at start, with and
            without guidance (and adapters), so that no request pays compilation or
            first-call costs; the replica reports ready only after them. Empty, or on a
            CPU: the smallest size only.
        presets: named settings (size, steps, guidance, adapters); default: the
            checkpoint's own presets.json if it has one (the demo's), else the family's
            (zimage: turbo; sdxl: niannian). A preset's adapter applies only where a
            file of that name is in `lora_dir`.
        default_preset: the preset a request without one gets; default: the first.
        lora_dir: the folder of this model's adapters (*.safetensors); "auto": the
            checkpoint's own `loras/` folder, if it has one; null: no adapters.
        lora: how adapters are served (see LoraSettings).
        encoder_precision: "default" (`dtype`) or "int8": the text encoders' linear
            layers with int8 weights, half their bf16 memory, on any device (torchao,
            `pip install '.[quant]'`); deploy/serve_config.24gb.yaml uses it.
        options: the family's own settings, checked by the family when replicas start
            (zimage: precision, cuda_graphs, fuse_projections, split_guidance; sdxl:
            cuda_graphs).
        memory: the replicas' memory caps and the Denoiser's budget (see
            MemorySettings).
        requests_per_replica: requests the whole service takes in at once for this
            model per running Denoiser replica (one drawing, the rest waiting for it),
            counted over every ingress replica; past it: 429 with Retry-After. Keep it
            at the Denoiser's max_ongoing_requests.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=MODEL_ID)
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "native"
    compile: bool | Literal["auto"] = "auto"
    compile_cache_dir: str | None = "auto"
    warmup_sizes: list[str] = Field(default_factory=list)
    presets: dict[str, Preset] | None = Field(None, min_length=1)
    default_preset: str | None = None
    lora_dir: str | None = "auto"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    encoder_precision: Literal["default", "int8"] = "default"
    options: dict = Field(default_factory=dict)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    requests_per_replica: int = Field(4, ge=1)

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if split_size(size) is None:
                raise ValueError(f"warmup size {size!r} is not 'WIDTHxHEIGHT'")
        return sizes

    @model_validator(mode="after")
    def _default_preset_exists(self) -> "ModelSettings":
        # Against the family's own presets, the replica checks when it starts.
        if self.presets is not None and self.default_preset not in (None, *self.presets):
            raise ValueError(
                f"default_preset {self.default_preset!r} is not among presets: "
                f"{', '.join(self.presets) or 'none'}"
            )
        return self

    def parsed_warmup_sizes(self) -> list[tuple[int, int]]:
        return [split_size(size) for size in self.warmup_sizes]

    def deployment_names(self) -> tuple[str, str]:
        """(PromptEncoder, Denoiser) deployment names of this model in deploy/*.yaml."""
        return f"PromptEncoder-{self.id}", f"Denoiser-{self.id}"


class ApiKeySettings(BaseModel):
    """Bearer-token access: `Authorization: Bearer <key>` on every route but the health
    routes and the page. Keys are never stored: each entry is `name:sha256-hex-of-key`
    (`python -m serve_app.ingress.keys new NAME` makes a key and its entry).

    Args:
        file: a file of entries, one a line (# comments); null for none.
        env: an environment variable of entries, comma or newline separated; null for
            none. At least one of the two must give a key.
        max_in_flight: requests one key may have in flight at once, over the whole
            service; past it: 429.
    """

    model_config = ConfigDict(extra="forbid")

    file: str | None = None
    env: str | None = "T2I_API_KEYS"
    max_in_flight: int = Field(8, ge=1)


class AppConfig(BaseModel):
    """Settings of the whole application.

    Args:
        models: the models served, each with its own replicas; the first is the default
            of a request that names none.
        min_side: smallest accepted image side in pixels.
        max_side: largest accepted image side in pixels.
        max_body_bytes: larger request bodies get 413.
        cancel_wait_s: how long POST /v1/requests/{id}/cancel waits for the stop.
        request_timeout_s: a generation still running after this is cancelled and
            answered 504; keep it below http_options.request_timeout_s (Ray's proxy
            would answer first, in its own words).
        api_keys: bearer-token access (see ApiKeySettings); off when null.
    """

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSettings] = Field(min_length=1)
    min_side: int = Field(256, ge=16)
    max_side: int = Field(2048, le=8192)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    cancel_wait_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(240.0, gt=0)
    api_keys: "ApiKeySettings | None" = None

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        ids = [m.id for m in models]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(repeated)}")
        return models

    @model_validator(mode="after")
    def _presets_within_limits(self) -> "AppConfig":
        for model in self.models:
            for name, p in (model.presets or {}).items():
                for side in (p.width, p.height):
                    if not self.min_side <= side <= self.max_side:
                        raise ValueError(
                            f"model {model.id!r}: preset {name!r} is {p.width}x{p.height}; "
                            f"sides must be from min_side {self.min_side} to max_side "
                            f"{self.max_side}"
                        )
        return self
