"""Named tensors <-> numpy arrays of their raw bits, so that an encoder's output crosses
to the denoiser's process without torch on the way (the ingress never imports it).

bfloat16 has no numpy dtype: its bits travel as int16 and are viewed back on arrival.
"""

import numpy as np
import torch


def to_arrays(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, dtype names) of CPU tensors, bit for bit."""
    arrays = {name: _bits(t) for name, t in tensors.items()}
    dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()}
    return arrays, dtypes


def from_arrays(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors `to_arrays` was given, on the CPU."""
    return {name: _unbits(a, dtypes[name]) for name, a in arrays.items()}


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _unbits(a: np.ndarray, dtype: str) -> torch.Tensor:
    # A copy: arrays that arrive through Ray's object store are read-only.
    t = torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
