"""Style adapters (LoRA) per request, for every family, without recompiling.

Files are read by diffusers' own LoRA loaders (diffusers/PEFT and kohya/A1111 formats).
The denoiser's model carries a fixed number of PEFT LoRA *slots* of a fixed maximum
rank, injected before it is compiled, the way diffusers' hot-swap prepares a model
(`enable_lora_hotswap`: ranks padded, scalings held as tensors). A request's adapters
are copied into the slots and their scales written into the scaling tensors in place,
so the compiled graphs never see a new module, shape or Python constant. A request
without adapters runs with the slots switched off (a second graph, compiled during the
warm-up): base requests pay nothing for the adapters others use.

Everything a request sets here is set on the replica's one worker thread right before
its steps, so requests with different adapters or scales never see each other's.
"""

import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

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
            slots cover. An adapter for any other layer is refused.
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


class LoraSlots:
    """K LoRA adapters of rank `max_rank` on every module of `model` that `targets`
    matches, all active; each request's adapters are copied into them.

    Create it before compiling the model. Slots start switched off, with zero weights.

    Args:
        model: the denoiser's transformer or UNet (a diffusers model).
        targets: regular expression of the module names to cover (full match).
        slots: how many adapters one request may combine.
        max_rank: the largest adapter rank accepted; smaller ones are zero-padded.
    """

    def __init__(self, model: torch.nn.Module, targets: str, slots: int, max_rank: int):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.targets, self.max_rank = targets, max_rank
        self.names = [f"slot{j}" for j in range(slots)]
        config = LoraConfig(r=max_rank, lora_alpha=max_rank, target_modules=targets)
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the plan
            warnings.simplefilter("ignore", UserWarning)
            for name in self.names:
                inject_adapter_in_model(config, model, adapter_name=name)
        # Scalings become tensors, written in place from now on (diffusers' hot-swap
        # preparation, which this is): a changed float would be a new graph constant.
        prepare_model_for_compiled_hotswap(model, target_rank=max_rank, check_compiled="ignore")
        self.layers: dict[str, LoraLayer] = {
            name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)
        }
        with torch.no_grad():
            for layer in self.layers.values():
                layer.set_adapter(self.names, inference_mode=True)
                for slot in self.names:
                    layer.lora_B[slot].weight.zero_()
                    layer.scaling[slot].fill_(0.0)
        model.requires_grad_(False)
        self.enabled = True
        self._enable(False)
        # What each slot holds, by weak reference: a slot does not keep an evicted
        # adapter's weights alive (its own copy of them is the slot's fixed memory).
        self._held: list[weakref.ref | None] = [None] * slots
        self._scale: list[float | None] = [0.0] * slots

    def to(self, device: torch.device) -> None:
        """Put the scales on `device`, with the model (moving the model leaves them: they
        are a dict's tensors, not buffers). A scale on the CPU is read by the host at each
        launch, so a CUDA graph would keep the value it had when captured: on an H200 the
        graphed step applied an adapter at the warm-up's scale 0 (images up to 82 levels
        off the same call without graphs, *sdxl-3*)."""
        for layer in self.layers.values():
            for slot in self.names:
                layer.scaling[slot] = layer.scaling[slot].to(device)

    def misfit(self, module: str, a_shape: tuple, b_shape: tuple) -> str | None:
        """Why an adapter's (lora_A, lora_B) for `module` cannot go into a slot, or None."""
        layer = self.layers.get(module)
        if layer is None:
            return f"it adapts '{module}', which is not a layer adapters apply to here"
        if len(a_shape) != 2 or len(b_shape) != 2:
            return f"'{module}' is a convolution adapter (LoCon); only linear layers are"
        slot_a = layer.lora_A[self.names[0]].weight
        slot_b = layer.lora_B[self.names[0]].weight
        rank = a_shape[0]
        if a_shape[1] != slot_a.shape[1] or b_shape[0] != slot_b.shape[0] or b_shape[1] != rank:
            return (
                f"'{module}' has shapes {list(a_shape)} and {list(b_shape)}, which do not fit "
                f"this model's {slot_a.shape[1]} -> {slot_b.shape[0]} layer (an adapter for "
                "another model?)"
            )
        if rank > self.max_rank:
            return f"its rank {rank} is above the max_rank {self.max_rank} set for this model"
        return None

    def set_enabled(self, enabled: bool) -> None:
        """Switch every slot on or off (the warm-up compiles both states)."""
        self._enable(enabled)

    @torch.no_grad()
    def activate(self, choices: list[tuple[Adapter, float]]) -> None:
        """Make the next forward passes apply `choices` (adapter, scale), one per slot;
        none switches the slots off. Copies weights only into slots holding another
        adapter, and writes scales only where they change."""
        if len(choices) > len(self.names):
            raise ValueError(f"{len(choices)} adapters for {len(self.names)} slots")
        self._enable(bool(choices))
        for j, slot in enumerate(self.names):
            held = self._held[j]() if self._held[j] is not None else None
            adapter, scale = choices[j] if j < len(choices) else (held, 0.0)
            if adapter is not held:
                self._copy(slot, adapter)
                self._held[j], self._scale[j] = weakref.ref(adapter), None
            if scale != self._scale[j]:
                for module, layer in self.layers.items():
                    weights = adapter.modules.get(module) if adapter is not None else None
                    layer.scaling[slot].fill_(0.0 if weights is None else weights[2] * scale)
                self._scale[j] = scale

    def _copy(self, slot: str, adapter: Adapter) -> None:
        for module, (a, b, _) in adapter.modules.items():
            layer = self.layers[module]
            rank = a.shape[0]
            layer.lora_A[slot].weight[:rank].copy_(a)
            slot_b = layer.lora_B[slot].weight
            slot_b.zero_()  # the columns past this adapter's rank meet rows of another's A
            slot_b[:, :rank].copy_(b)

    def _enable(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        for layer in self.layers.values():
            layer.enable_adapters(enabled)
            for slot in self.names:  # enable_adapters marks them trainable again
                layer.lora_A[slot].requires_grad_(False)
                layer.lora_B[slot].requires_grad_(False)
        self.enabled = enabled


def read_adapter(
    path: Path, family: LoraFamily, slots: LoraSlots, device: torch.device, dtype: torch.dtype
) -> Adapter:
    """Read an adapter file with the family's diffusers loader, check every layer of it
    against `slots`, and put its weights on `device`.

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
        reason = slots.misfit(module, tuple(a.shape), tuple(b.shape))
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


class AdapterCache:
    """Resident adapters, least recently used evicted first, bounded by count and bytes.
    A pinned adapter (used by a running or queued request) is never evicted; the cache
    may exceed its bounds while everything in it is pinned, and evicts once unpinned.

    Args:
        max_count: adapters kept at most.
        max_bytes: device bytes their weights may take at most.
    """

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._pins: dict[int, int] = {}

    @property
    def names(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def get(self, name: str) -> Adapter | None:
        """The resident adapter `name` (now the most recently used), or None."""
        adapter = self._entries.get(name)
        if adapter is not None:
            self._entries.move_to_end(name)
        return adapter

    def put(self, adapter: Adapter) -> list[str]:
        """Keep `adapter` (replacing one of its name); returns the names evicted."""
        self._entries[adapter.name] = adapter
        self._entries.move_to_end(adapter.name)
        return self._evict(keep=adapter.name)

    def pin(self, adapter: Adapter) -> None:
        self._pins[id(adapter)] = self._pins.get(id(adapter), 0) + 1

    def unpin(self, adapter: Adapter) -> list[str]:
        """Release one pin; returns the names this lets the cache evict."""
        left = self._pins.pop(id(adapter)) - 1
        if left:
            self._pins[id(adapter)] = left
        return self._evict()

    def _evict(self, keep: str | None = None) -> list[str]:
        evicted = []
        for name in list(self._entries):
            over = len(self._entries) > self.max_count or self.nbytes > self.max_bytes
            if not over:
                break
            if name != keep and id(self._entries[name]) not in self._pins:
                del self._entries[name]
                evicted.append(name)
        return evicted
