"""Random adapters for the embedded tiny checkpoints and the benchmarks, saved through the
real save paths (diffusers' `save_lora_weights`, with PEFT's config as its metadata) and
in kohya's format, so that the LoRA path can be tried and tested with no download."""

import re
from pathlib import Path

import torch

from serve_app.engine.lora import SUFFIX


def random_lora(
    model: torch.nn.Module,
    targets: str,
    rank: int,
    alpha: float,
    seed: int,
    scale: float = 0.3,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in PEFT's keys, LoraConfig as a dict) of a random rank-`rank` adapter
    on the linear layers of `model` whose names match `targets` (full match). Both
    matrices are drawn (PEFT would start lora_B at zero: an adapter that changes nothing).
    `model` may be on the meta device: only its layers' shapes are read. `dtype`: that of
    the layers' weights unless given."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    state, names = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(targets, name):
            names.append(name)
            for kind, shape in (
                ("A", (rank, module.in_features)),
                ("B", (module.out_features, rank)),
            ):
                draw = torch.randn(shape, generator=generator) * scale
                state[f"{name}.lora_{kind}.weight"] = draw.to(dtype or module.weight.dtype)
    if not names:
        raise ValueError(f"no linear layer matches {targets!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # JSON has no sets
    return state, config


def save_kohya(path: Path, state: dict[str, torch.Tensor], alpha: float) -> None:
    """`state` (PEFT keys: "<module>.lora_A.weight") in kohya's format: "lora_unet_" +
    the module path with underscores, lora_down/lora_up, and an alpha per module."""
    from safetensors.torch import save_file

    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path.with_suffix(SUFFIX)))
