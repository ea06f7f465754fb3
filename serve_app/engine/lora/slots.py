"""Hot-swapped adapters: LoRA slots in the model, written per request.

The denoiser's model carries a fixed number of PEFT LoRA *slots* of a fixed maximum
rank, injected before it is compiled, the way diffusers' hot-swap prepares a model
(`enable_lora_hotswap`: ranks padded, scalings held as tensors). A request's adapters
are copied into the slots and their scales written into the scaling tensors in place,
so the compiled graphs never see a new module, shape or Python constant. A request
without adapters runs with the slots switched off (a second graph, compiled during the
warm-up): base requests pay nothing for the adapters others use. A request with one
pays its rank's products at every adapted layer of every step (see FusedLora for the
other way).
"""

import warnings
import weakref

import torch

from serve_app.engine.lora.files import Adapter, misfit

# Slots on, every scale 0: what the warm-up runs so that the slots' graph is compiled too.
BLANK = Adapter("", 0, {}, [], 0)


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

    host_bytes = 0  # no host copy: the weights are never changed

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
        base = layer.get_base_layer() if layer is not None else None
        return misfit(base, module, a_shape, b_shape, self.max_rank)

    @property
    def warmup_states(self) -> list[list[tuple[Adapter, float]]]:
        """What the warm-up runs so that both of the slots' states are compiled."""
        return [[], [(BLANK, 0.0)]]

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
