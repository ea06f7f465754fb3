"""The engine: plain torch + diffusers, no Ray. One module per model family.

encoder = load_encoder("tiny")            # or a local Z-Image-Turbo folder
denoiser = load_denoiser("tiny")
emb = encoder.encode(prompt, None, with_negative=False)
[pixels] = denoiser.generate(params, emb)
"""

import torch

from serve_app.engine import checkpoint, zimage

FAMILY_MODULES = {"zimage": zimage}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def load_encoder(model: str, device: str = "auto", dtype: str = "auto"):
    """Load the prompt encoder of `model` ("tiny" or a local diffusers folder)."""
    path, family = checkpoint.resolve(model)
    dev = pick_device(device)
    return FAMILY_MODULES[family].ZImageEncoder.from_pretrained(path, dev, pick_dtype(dtype, dev))


def load_denoiser(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    attention_backend: str = "native",
    compile: bool | str = False,
    fuse_projections: bool = False,
):
    """Load the denoiser (transformer + VAE + scheduler config) of `model`."""
    path, family = checkpoint.resolve(model)
    dev = pick_device(device)
    return FAMILY_MODULES[family].ZImageDenoiser.from_pretrained(
        path,
        dev,
        pick_dtype(dtype, dev),
        attention_backend,
        pick_compile(compile, dev),
        fuse_projections,
    )
