"""The engine: plain torch + diffusers, no Ray. One package per model family.

encoder = load_encoder("demo")            # or "tiny", "tiny-sdxl", or a local folder
denoiser = load_denoiser("demo")
embeddings = encoder.encode_params(params)
[pixels] = denoiser.generate(params, embeddings)
"""

import importlib
from pathlib import Path
from types import ModuleType

import torch

from serve_app.engine import checkpoint
from serve_app.engine.compiling import use_compile_cache
from serve_app.engine.denoiser import LoraOptions

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def family_module(family: str) -> ModuleType:
    """The engine package of `family` ("zimage", "sdxl")."""
    return importlib.import_module(f"serve_app.engine.{family}")


def pick_device(device: str = "auto") -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" is bfloat16 on CUDA and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def pick_compile(compile: bool | str, device: torch.device) -> bool:
    """ "auto" compiles on CUDA only: on a CPU the compilation costs more than it saves."""
    if compile == "auto":
        return device.type == "cuda"
    return bool(compile)


ENCODER_PRECISIONS = ("default", "int8")


def load_encoder(model: str, device: str = "auto", dtype: str = "auto", precision="default"):
    """Load the prompt encoder of `model` ("demo", "tiny", "tiny-sdxl" or a local folder).

    Args:
        precision: "default" (`dtype`) or "int8": the text encoders' linear layers with
            int8 weights (precision.quantize_int8_weights; torchao).
    """
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"encoder precision {precision!r}: use one of {ENCODER_PRECISIONS}")
    path, family = checkpoint.resolve(model)
    dev = pick_device(device)
    prepare = None
    if precision == "int8":
        from serve_app.engine.precision import quantize_int8_weights as prepare
    return family_module(family).Encoder.from_pretrained(path, dev, pick_dtype(dtype, dev), prepare)


def load_denoiser(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    attention_backend: str = "native",
    compile: bool | str = False,
    options: dict | None = None,
    lora: LoraOptions | None = None,
    compile_cache: Path | None = None,
):
    """Load the denoiser (model + VAE + scheduler config) of `model`.

    Args:
        options: the family's own settings, checked against its `Options` (a misspelt
            key is an error).
        lora: how the model applies adapters, or None for a model that serves none.
        compile_cache: where compiled graphs are kept between starts (see
            compiling.use_compile_cache); None: torch's default, under /tmp.
    """
    path, family = checkpoint.resolve(model)
    dev = pick_device(device)
    module = family_module(family)
    compiled = pick_compile(compile, dev)
    if compiled and compile_cache is not None:
        use_compile_cache(compile_cache)
    denoiser = module.Denoiser.from_pretrained(
        path,
        dev,
        pick_dtype(dtype, dev),
        attention_backend,
        compiled,
        module.Options.model_validate(options or {}),
        lora,
    )
    own = checkpoint.read_presets(path)
    if own is not None:  # the checkpoint's presets replace its family's
        denoiser.presets, denoiser.default_preset = own
    return denoiser
