"""Quantised linear layers, opt-in, through torchao's training-free inference paths.

Float8 (a Z-Image transformer's `precision: fp8`): weights in float8 with a scale per
output row, activations quantised per row as they come, matrix products on the tensor
cores' float8 path, applied to the layers a family names.

Int8 weights (a model's `encoder_precision: int8`): every linear layer of the text
encoders with int8 weights and a scale per output channel, dequantised in each product;
activations stay in the model's dtype. Half a bf16 encoder's linear weights on any device,
for a card too small to hold the text encoder beside the denoiser.
"""

import re

import torch

# Float8 matrix products need Ada (8.9) or Hopper (9.0) tensor cores or newer.
FP8_CAPABILITY = (8, 9)


def stored(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors `tensor` is stored in: itself, or a quantised tensor's (a
    torchao subclass reporting its logical dtype) inner data and scales."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [inner for name in names for inner in stored(getattr(tensor, name))]
    return [tensor]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` holds, a quantised one's at their real size."""
    return sum(inner.numel() * inner.element_size() for inner in stored(tensor))


def has_float8(model: torch.nn.Module) -> bool:
    """Whether any of `model`'s parameters is stored in float8."""
    float8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return any(inner.dtype in float8 for p in model.parameters() for inner in stored(p))


def weights_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the parameters of `modules`, quantised ones at their real size."""
    return sum(tensor_bytes(p) for m in modules for p in m.parameters())


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
            "precision fp8 runs on torchao, which is not installed: pip install '.[quant]'"
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


def quantize_int8_weights(module: torch.nn.Module, device: torch.device) -> int:
    """In place: every nn.Linear of `module` gets int8 weights with a scale per output
    channel (torchao's Int8WeightOnlyConfig), quantised on `device` a layer at a time
    and left there (the rest of `module` stays where it is: the full-precision model
    never needs the device's memory whole). Returns how many layers changed.

    Raises:
        ImportError: torchao is not installed.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError(
            "encoder_precision int8 runs on torchao, which is not installed: pip install '.[quant]'"
        ) from exc

    def linear(module: torch.nn.Module, _name: str = "") -> bool:
        return isinstance(module, torch.nn.Linear)

    quantize_(module, Int8WeightOnlyConfig(), filter_fn=linear, device=device)
    return sum(map(linear, module.modules()))
