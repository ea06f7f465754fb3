"""Style adapters (LoRA) per request, for every family, without recompiling.

Files are read by diffusers' own LoRA loaders (diffusers/PEFT and kohya/A1111 formats)
and checked layer by layer against the model (files.py). A model applies them in one
of two ways, its `lora.mode`:
- `fuse` (fused.py): a request's adapters are merged into the weights, from a host copy
  of the originals; a step costs what the base model's does, a change of adapters costs
  a copy back and a merge;
- `hotswap` (slots.py): adapters are copied into LoRA slots compiled into the model;
  a change costs a copy of the adapter's matrices, every step their products.
Neither recompiles. The replica keeps the adapters it read resident (cache.py).

Everything a request sets here is set on the replica's one worker thread right before
its steps, so requests with different adapters or scales never see each other's.
"""

from serve_app.engine.lora.cache import AdapterCache
from serve_app.engine.lora.files import (
    SUFFIX,
    Adapter,
    LoraFamily,
    Target,
    available,
    locate,
    read_adapter,
)
from serve_app.engine.lora.fused import FusedLora
from serve_app.engine.lora.slots import LoraSlots

__all__ = [
    "SUFFIX",
    "Adapter",
    "AdapterCache",
    "FusedLora",
    "LoraFamily",
    "LoraSlots",
    "Target",
    "available",
    "locate",
    "read_adapter",
]
