"""Float8 linear layers, opt-in: torchao's training-free inference path (weights in
float8 with a scale per output row, activations quantised per row as they come, matrix
products on the tensor cores' float8 path), applied to the layers a family names."""

import re

import torch

# Float8 matrix products need Ada (8.9) or Hopper (9.0) tensor cores or newer.
FP8_CAPABILITY = (8, 9)


def quantize_fp8(model: torch.nn.Module, targets: str, device: torch.device) -> int:
    """In place: every nn.Linear of `model` whose qualified name matches `targets` (a
    regular expression, matched in full) becomes a float8 linear layer, and the model
    moves to `device` (a layer at a time, each quantised there: the bf16 model never
    needs the device's memory whole). Call before compiling. Returns how many layers
    changed.

    Raises:
        ValueError: the device cannot run float8 matrix products, or nothing matched.
        ImportError: torchao is not installed.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(
            f"precision fp8 needs an NVIDIA GPU of compute capability "
            f"{'.'.join(map(str, FP8_CAPABILITY))} or newer (Ada, Hopper, Blackwell); "
            f"this model runs on {name}: use precision default"
        )
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ImportError(
            "precision fp8 runs on torchao, which is not installed: pip install '.[fp8]'"
        ) from exc
    pattern = re.compile(targets)
    chosen = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    }
    if not chosen:
        raise ValueError(f"precision fp8: no linear layer matches {targets!r}")
    quantize_(
        model,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda module, name: name in chosen,
        device=device,
    )
    return len(chosen)
