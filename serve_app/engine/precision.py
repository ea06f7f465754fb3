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

# Passed to torchao's quantisation configs so that they leave inductor's settings alone.
# By default (`set_inductor_config=True`) quantising turns on coordinate-descent tuning
# for the whole process: every Triton kernel compiled after it, in every region, is timed
# in dozens of variants on its first call. On an H100, two float8 feed-forward blocks
# compiled for a batch of 2 took 23.1 s to their first output with it and 1.6 s without
# (64 coordinate-descent timings against none; *-2026-12-06-f8-inductor*); a float8
# Z-Image replica's warm-up had run past 470 s (*perf-9*, *perf-13*); without it the
# replica was ready in 158.6 s, for a step about 3% slower (*perf-15*). It also chose
# kernels by timing them, which inductor's deterministic mode (compiling.configure_dynamo)
# is there to avoid.
KEEP_INDUCTOR_CONFIG = {"set_inductor_config": False}


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` holds: a quantised tensor's (a torchao subclass reporting its
    logical dtype) are its inner data's and scales'."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


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
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **KEEP_INDUCTOR_CONFIG),
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

    quantize_(module, Int8WeightOnlyConfig(**KEEP_INDUCTOR_CONFIG), filter_fn=linear, device=device)
    return sum(map(linear, module.modules()))
