"""Adapter files: which a model's folder holds, reading one with the family's diffusers
loader, and checking every layer of it against the layers the model adapts."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from serve_app.errors import AdapterError, UnknownLora
from serve_app.schema import check_lora_name

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraFamily:
    """What the LoRA code needs to know of a family.

    Args:
        loader: the family's diffusers LoRA loader mixin (its `lora_state_dict` reads
            and converts a file).
        prefix: the key prefix of the denoiser's model in a loaded state dict
            ("transformer", "unet").
        targets: a regular expression (full match) of the model's module names the
            slots or merges cover. An adapter for any other layer is refused.
        loader_kwargs: extra arguments `lora_state_dict` needs for this family.
    """

    loader: type
    prefix: str
    targets: str
    loader_kwargs: dict = field(default_factory=dict)


@dataclass(eq=False)
class Adapter:
    """One adapter file, read, checked against the model and resident on its device.

    Args:
        name: the file's name without ".safetensors".
        nbytes: device bytes its weights take.
        modules: module name -> (lora_A weight, lora_B weight, alpha / rank).
        ignored: parts of the file this service does not apply (e.g. text encoders).
        rank: the largest rank of its modules.
        stamp: what identifies the file it was read from (set by whoever read it).
    """

    name: str
    nbytes: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ignored: list[str]
    rank: int
    stamp: tuple | None = None


def available(folder: Path | None) -> dict[str, Path]:
    """The adapters in `folder`: name -> file, for every *.safetensors file in it."""
    if folder is None or not folder.is_dir():
        return {}
    return {
        p.name.removesuffix(SUFFIX): p
        for p in sorted(folder.iterdir())
        if p.name.endswith(SUFFIX) and p.is_file() and not p.name.startswith(".")
    }


def locate(folder: Path | None, name: str) -> Path:
    """The file of adapter `name` in `folder`; raises UnknownLora listing what is there."""
    check_lora_name(name)
    found = available(folder)
    if name not in found:
        raise UnknownLora(name, sorted(found))
    return found[name]


class Target(Protocol):
    """Where a model's adapters are applied (LoraSlots or FusedLora)."""

    host_bytes: int  # the host memory it keeps for them (FusedLora's original weights)

    def misfit(self, module: str, a_shape: tuple, b_shape: tuple) -> str | None:
        """Why an adapter's (lora_A, lora_B) for `module` cannot be applied, or None."""


def misfit(
    layer: torch.nn.Linear | None, module: str, a_shape: tuple, b_shape: tuple, max_rank: int
) -> str | None:
    """Why an adapter's (lora_A, lora_B) of shapes `a_shape`, `b_shape` cannot apply to
    `layer` (the model's linear layer `module`, or None where adapters do not apply)."""
    if layer is None:
        return f"it adapts '{module}', which is not a layer adapters apply to here"
    if len(a_shape) != 2 or len(b_shape) != 2:
        return f"'{module}' is a convolution adapter (LoCon); only linear layers are"
    rank = a_shape[0]
    fan_in, fan_out = layer.in_features, layer.out_features
    if a_shape[1] != fan_in or b_shape[0] != fan_out or b_shape[1] != rank:
        return (
            f"'{module}' has shapes {list(a_shape)} and {list(b_shape)}, which do not fit "
            f"this model's {fan_in} -> {fan_out} layer (an adapter for another model?)"
        )
    if rank > max_rank:
        return f"its rank {rank} is above the max_rank {max_rank} set for this model"
    return None


def read_adapter(
    path: Path, family: LoraFamily, target: Target, device: torch.device, dtype: torch.dtype
) -> Adapter:
    """Read an adapter file with the family's diffusers loader, check every layer of it
    against `target` (the model's adapted layers), and put its weights on `device`.

    Raises:
        AdapterError: the file is not a LoRA for this model, naming the file and why.
    """
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    def refuse(reason: str) -> AdapterError:
        return AdapterError(path.name, reason)

    try:
        state_dict, alphas, metadata = _load(path, family)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault
        raise refuse(f"it is not a readable LoRA file ({type(exc).__name__}: {exc})") from None
    prefix = family.prefix + "."
    ours = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    ignored = sorted({k.split(".")[0] for k in state_dict if not k.startswith(prefix)})
    if not ours:
        return_keys = ", ".join(sorted(state_dict)[:3]) or "none"
        raise refuse(f"it holds no weights for this model's {family.prefix} (keys: {return_keys})")
    if not any("lora_A" in k for k in ours):
        ours = convert_unet_state_dict_to_peft(ours)
    kinds = {k.rsplit(".lora_", 1)[-1] if ".lora_" in k else k for k in ours}
    if kinds - {"A.weight", "B.weight"}:
        raise refuse(f"it has weights other than plain LoRA A/B matrices: {sorted(kinds)[:4]}")
    if metadata:
        kwargs = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
        kwargs = kwargs or metadata
    else:
        ranks = {f"^{k}": v.shape[1] for k, v in ours.items() if k.endswith("lora_B.weight")}
        ours_alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items()}
        kwargs = get_peft_kwargs(ranks, ours_alphas, ours, is_unet=True)
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise refuse(f"its LoRA settings are not valid ({exc})") from None
    if config.use_dora:
        raise refuse("it is a DoRA adapter; only plain LoRA is served")

    modules, nbytes = {}, 0
    for key in sorted(ours):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        a, b = ours[key], ours.get(f"{module}.lora_B.weight")
        if b is None:
            raise refuse(f"'{module}' has a lora_A matrix without its lora_B")
        reason = target.misfit(module, tuple(a.shape), tuple(b.shape))
        if reason is not None:
            raise refuse(reason)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"'{module}' holds NaN or infinite weights")
        rank = a.shape[0]
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        try:
            a, b = a.to(device, dtype), b.to(device, dtype)
        except torch.OutOfMemoryError:
            raise refuse("the device has no memory left for it now; retry later") from None
        modules[module] = (a, b, float(scale))
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    if len(modules) * 2 != len(ours):
        raise refuse("its lora_A and lora_B matrices do not pair up")
    rank = max(a.shape[0] for a, _, _ in modules.values())
    return Adapter(path.name.removesuffix(SUFFIX), nbytes, modules, ignored, rank)


def _load(path: Path, family: LoraFamily) -> tuple[dict, dict | None, dict | None]:
    """(state dict, kohya alphas or None, diffusers metadata or None) of a file."""
    loaded = family.loader.lora_state_dict(
        str(path), return_lora_metadata=True, **family.loader_kwargs
    )
    if len(loaded) == 3:  # loaders of UNet families also return kohya's network alphas
        return loaded
    state_dict, metadata = loaded
    return state_dict, None, metadata
