"""Application settings: the `args` of deploy/serve_config.yaml, read once by the builder.

Unknown keys are errors, so a misspelt setting fails the deploy instead of being ignored.
Replica counts, GPUs and autoscaling are not here: they are Serve's own `deployments`
options in the same file.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.schema import split_size


class ModelSettings(BaseModel):
    """What the model replicas load and how.

    Args:
        model: "tiny" (embedded, generated on first use, draws noise) or the path of a
            local diffusers-format folder, e.g. a download of Tongyi-MAI/Z-Image-Turbo.
        device: "auto" (CUDA if present, else CPU), "cuda", "cuda:1" or "cpu".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32".
        attention_backend: diffusers attention backend of the transformer: "native"
            (PyTorch SDPA), "flash", "_native_cudnn", "xformers", ...
        compile: torch.compile the transformer's repeated blocks and the VAE decoder.
            "auto" (default): on CUDA only. Compiled once, with dynamic shapes, during
            the denoiser's warm-up; the README's performance section has what it buys.
        fuse_projections: one GEMM for each attention's q, k, v projections and one
            for each feed-forward's w1, w3; same math, same weight memory.
        warmup_sizes: image sizes ("WxH") the denoiser runs once at start, with and
            without guidance, so that no request pays compilation or first-call costs;
            the replica reports ready only after them. Empty: the smallest size only.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "native"
    compile: bool | Literal["auto"] = "auto"
    fuse_projections: bool = False
    warmup_sizes: list[str] = Field(default_factory=list)

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if split_size(size) is None:
                raise ValueError(f"warmup size {size!r} is not 'WIDTHxHEIGHT'")
        return sizes

    def parsed_warmup_sizes(self) -> list[tuple[int, int]]:
        return [split_size(size) for size in self.warmup_sizes]


class AppConfig(BaseModel):
    """Settings of the whole application.

    Args:
        model: see ModelSettings.
        served_model_name: the id in GET /v1/models and the accepted `model` field;
            defaults to the family name ("zimage").
        min_side: smallest accepted image side in pixels.
        max_side: largest accepted image side in pixels.
        max_body_bytes: larger request bodies get 413.
        cancel_wait_s: how long POST /v1/requests/{id}/cancel waits for the stop.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    served_model_name: str | None = None
    min_side: int = Field(256, ge=16)
    max_side: int = Field(2048, le=8192)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    cancel_wait_s: float = Field(30.0, gt=0)
