"""Adapters per request, for each family and each way of applying them (merged or
hot-swapped): both file formats, scales, isolation between requests, refusals that name
the file, no recompilation on a swap, the resident cache."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.engine import LoraOptions, lora
from serve_app.engine.lora import Adapter, AdapterCache
from serve_app.engine.stages import StageRecorder
from serve_app.errors import AdapterError, BadLoraName, DoesNotFit, UnknownLora
from tests.engine.conftest import FAMILY_PARAMS, MODELS, lora_mode


def adapters(folder: Path, den) -> dict[str, Adapter]:
    return {name: den.read_adapter(path) for name, path in lora.available(folder).items()}


def draw(enc, den, p, loras=()):
    return den.generate(p, enc.encode_params(p), loras=loras)[0]


def differ(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_both_formats_load_with_their_scales(lora_family):
    name, _, den, path = lora_family
    found = adapters(path / "loras", den)
    assert set(found) == {"tiny-style", "tiny-kohya"}
    style, kohya = found["tiny-style"], found["tiny-kohya"]
    assert style.rank == kohya.rank == 4 and not style.ignored
    assert all(s == 1.0 for _, _, s in style.modules.values())  # alpha == rank
    # kohya's alpha 2 at rank 4: SDXL's loader passes it on, Z-Image's folds it into the
    # weights; either way the adapter applies at half strength.
    kohya_scales = {s for _, _, s in kohya.modules.values()}
    assert kohya_scales == ({0.5} if name == "sdxl" else {1.0})
    assert set(style.modules).isdisjoint(kohya.modules)  # attention vs feed-forward


def test_scale_zero_is_the_base_image_and_a_scale_changes_it(lora_family):
    name, enc, den, path = lora_family
    p = replace(FAMILY_PARAMS[name], num_inference_steps=3)
    found = adapters(path / "loras", den)
    base = draw(enc, den, p)
    for adapter in found.values():
        np.testing.assert_array_equal(draw(enc, den, p, [(adapter, 0.0)]), base)
        styled = draw(enc, den, p, [(adapter, 0.85)])
        assert differ(styled, base) > 1
        np.testing.assert_array_equal(draw(enc, den, p, [(adapter, 0.85)]), styled)
        assert differ(draw(enc, den, p, [(adapter, 1.7)]), styled) > 1


def test_interleaved_adapters_and_scales_never_bleed(lora_family):
    """Requests alternating adapters, scales and none, one after another on one denoiser
    (as its replica runs them): each equals its result alone."""
    name, enc, den, path = lora_family
    p = replace(FAMILY_PARAMS[name], num_inference_steps=2)
    found = adapters(path / "loras", den)
    style, kohya = found["tiny-style"], found["tiny-kohya"]
    plan = [[], [(style, 0.85)], [(kohya, 0.5)], [(style, 0.3)], [], [(style, 0.85), (kohya, 1.0)]]
    alone = [draw(enc, den, p, loras) for loras in plan]
    for loras, expected in reversed(list(zip(plan, alone, strict=True))):
        np.testing.assert_array_equal(draw(enc, den, p, loras), expected)
    both = alone[-1]
    assert differ(both, alone[1]) > 1  # the second slot adds its own adapter


def test_a_corrupt_file_is_refused_by_name_and_the_model_still_draws(lora_family, tmp_path):
    name, enc, den, _ = lora_family
    p = replace(FAMILY_PARAMS[name], num_inference_steps=2)
    base = draw(enc, den, p)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(AdapterError, match="'broken.safetensors'.*not a readable LoRA"):
        den.read_adapter(bad)
    np.testing.assert_array_equal(draw(enc, den, p), base)


def test_an_adapter_for_the_other_family_is_refused(lora_family):
    name, _, den, _ = lora_family
    from serve_app.engine import checkpoint

    other = checkpoint.resolve(MODELS["sdxl" if name == "zimage" else "zimage"])[0]
    with pytest.raises(AdapterError, match="tiny-style.safetensors' cannot be used"):
        den.read_adapter(other / "loras" / "tiny-style.safetensors")


def test_an_adapter_above_the_max_rank_is_refused(lora_family, tmp_path):
    name, _, den, path = lora_family
    from serve_app.engine import load_denoiser

    small = load_denoiser(
        MODELS[name], device="cpu", dtype="float32", lora=LoraOptions(slots=1, max_rank=2)
    )
    with pytest.raises(AdapterError, match="rank 4 is above the max_rank 2"):
        small.read_adapter(path / "loras" / "tiny-style.safetensors")


def test_swapping_adapters_and_scales_never_recompiles(lora_family, eager_compile):
    """Compiled (Dynamo's graphs and guards; the "eager" backend skips code generation),
    warmed in each adapter state with graphs of its own (hotswap: the slots off and on):
    adapters, scales and none in any order, with and without guidance, run on the graphs
    the warm-up made."""
    family, enc, plain, path = lora_family
    from serve_app.engine import load_denoiser

    lora = LoraOptions(slots=2, max_rank=8, mode=lora_mode(plain))
    den = load_denoiser(MODELS[family], "cpu", "float32", compile=True, lora=lora)
    den.warmup([(256, 256)])
    found = adapters(path / "loras", den)
    adapter, other = found["tiny-style"], found["tiny-kohya"]
    base = FAMILY_PARAMS[family]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loras, guidance in [
            ([(adapter, 0.85)], base.guidance_scale),
            ([(other, 0.4)], 0.0),
            ([], base.guidance_scale),
            ([(adapter, 1.3), (other, 0.2)], 0.0),
            ([(other, 2.0)], base.guidance_scale),
        ]:
            p = replace(base, num_inference_steps=1, guidance_scale=guidance)
            got = den.generate(p, enc.encode_params(p), loras=loras)[0]
            # The graphs use each request's own adapters and scales: the same pixels as
            # the uncompiled model's for the same adapters.
            mine = [(plain.read_adapter(path / "loras" / f"{a.name}.safetensors"), s)
                    for a, s in loras]  # fmt: skip
            np.testing.assert_array_equal(got, draw(enc, plain, p, mine))


def test_names_are_checked_before_any_file_is_touched(tmp_path):
    (tmp_path / "good.safetensors").write_bytes(b"x")
    assert lora.locate(tmp_path, "good") == tmp_path / "good.safetensors"
    for bad in ["../good", "a/b", "a\\b", "x\x00y", ".hidden", "n" * 129]:
        with pytest.raises(BadLoraName):
            lora.locate(tmp_path, bad)
    with pytest.raises(UnknownLora, match="available: good"):
        lora.locate(tmp_path, "missing")


def fake(name: str, nbytes: int) -> Adapter:
    return Adapter(name, nbytes, {}, [], 1)


def test_cache_evicts_least_recently_used_by_count_and_by_bytes():
    cache = AdapterCache(max_count=2, max_bytes=100)
    a, b, c = fake("a", 10), fake("b", 10), fake("c", 10)
    assert cache.put(a) == [] and cache.put(b) == []
    assert cache.get("a") is a  # now b is the least recently used
    assert cache.put(c) == ["b"] and cache.names == ["a", "c"]
    assert cache.put(fake("big", 85)) == ["a"]  # 10 + 85 fits, 20 + 85 does not
    assert cache.names == ["c", "big"] and cache.nbytes == 95


def test_cache_never_evicts_a_pinned_adapter():
    cache = AdapterCache(max_count=1, max_bytes=10**9)
    a, b = fake("a", 1), fake("b", 1)
    cache.put(a)
    cache.pin(a)
    assert cache.put(b) == [] and cache.names == ["a", "b"]  # over its count, a pinned
    cache.pin(b)
    assert cache.unpin(a) == ["a"] and cache.names == ["b"]


@pytest.mark.parametrize("name", ["tiny-style", "tiny-kohya"])
def test_an_adapter_draws_what_the_stock_pipeline_draws_with_it(lora_family, name):
    """The same file through diffusers' own pipeline (load_lora_weights + set_adapters,
    its PEFT layers): our slots and merges give its pixels, for both formats and
    families."""
    from diffusers import DiffusionPipeline

    family, enc, den, path = lora_family
    p = replace(FAMILY_PARAMS[family], num_inference_steps=3)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path / "loras" / f"{name}.safetensors"), adapter_name="x")
    pipe.set_adapters(["x"], [0.85])
    ref = pipe(
        p.prompt,
        height=p.height,
        width=p.width,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="np",
    ).images[0]
    ref = (ref * 255).round().astype("uint8")
    adapter = den.read_adapter(path / "loras" / f"{name}.safetensors")
    ours = draw(enc, den, p, [(adapter, 0.85)])
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert differ(ours, draw(enc, den, p)) > 1  # and the adapter changed the image


def test_a_smaller_rank_after_a_larger_one_in_the_same_slot(lora_family, tmp_path):
    """A slot holds rank `max_rank`: an adapter of rank 2 after one of rank 4 must not
    meet the rest of the first one's matrices."""
    from serve_app.engine.tiny import random_lora

    family, enc, den, path = lora_family
    if lora_mode(den) != "hotswap":
        pytest.skip("merged adapters have no slots")
    p = replace(FAMILY_PARAMS[family], num_inference_steps=2)
    with torch.device("meta"):  # the model's layers without the slots wrapped round them
        bare = type(den.model).from_config(den.model.config)
    state, config = random_lora(bare, den.lora_family.targets, 2, 2, seed=5, dtype=torch.float32)
    den.lora_family.loader.save_lora_weights(
        tmp_path,
        weight_name="rank2.safetensors",
        **{f"{den.lora_family.prefix}_lora_layers": state},
        **{f"{den.lora_family.prefix}_lora_adapter_metadata": config},
    )
    small = den.read_adapter(tmp_path / "rank2.safetensors")
    large = den.read_adapter(path / "loras" / "tiny-style.safetensors")
    assert (small.rank, large.rank) == (2, 4)
    draw(enc, den, p, [(large, 1.0)])  # the slot now holds rank 4
    after = draw(enc, den, p, [(small, 1.0)])
    draw(enc, den, p, [])
    with torch.no_grad():  # empty slots, as if the rank-4 adapter had never been there
        for layer in den.lora.layers.values():
            for slot in den.lora.names:
                layer.lora_A[slot].weight.zero_()
                layer.lora_B[slot].weight.zero_()
    den.lora._held = [None] * len(den.lora.names)
    np.testing.assert_array_equal(draw(enc, den, p, [(small, 1.0)]), after)


def test_the_slots_scales_go_where_the_model_goes():
    from serve_app.engine.lora import LoraSlots

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8))
    slots = LoraSlots(model, r"proj", slots=2, max_rank=4)
    slots.to(torch.device("meta"))  # as a CUDA device would, with no CUDA here
    scales = [layer.scaling[s] for layer in slots.layers.values() for s in slots.names]
    assert len(scales) == 2 and all(t.device.type == "meta" for t in scales)


def original_weights(den) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in den.lora.layers.items()}


def test_a_merge_always_starts_from_the_original_weights(lora_family):
    """Merged adapters: after any sequence of adapters and scales, a request without one
    runs on the very weights the model was loaded with."""
    _, _, den, path = lora_family
    if lora_mode(den) != "fuse":
        pytest.skip("hot-swapped adapters never touch the weights")
    found = adapters(path / "loras", den)
    style, kohya = found["tiny-style"], found["tiny-kohya"]
    den.lora.activate([])
    before = original_weights(den)
    for loras in [[(style, 0.85)], [(style, 0.3)], [(kohya, 2.0), (style, 1.0)], [(kohya, 0.0)]]:
        den.lora.activate(loras)
        changed = sum(not torch.equal(w, before[n]) for n, w in original_weights(den).items())
        assert changed == len({m for a, s in loras if s for m in a.modules})
    for name, weight in original_weights(den).items():  # scale 0: the originals, bit for bit
        assert torch.equal(weight, before[name]), name


def test_a_merge_that_fails_halfway_leaves_the_original_weights(lora_family):
    """A merge that stops partway (here: a layer's matrices of the wrong shape, as an
    out-of-memory error would stop it) puts back what it had changed."""
    name, enc, den, path = lora_family
    if lora_mode(den) != "fuse":
        pytest.skip("hot-swapped adapters never touch the weights")
    p = replace(FAMILY_PARAMS[name], num_inference_steps=2)
    style = adapters(path / "loras", den)["tiny-style"]
    den.lora.activate([])
    before, base = original_weights(den), draw(enc, den, p)
    modules = dict(style.modules)
    last = sorted(modules)[-1]
    a, b, factor = modules[last]
    modules[last] = (a[:, :1], b, factor)  # sorted last: merged after all the others
    broken = Adapter("broken", 0, modules, [], style.rank)
    with pytest.raises(RuntimeError):
        den.lora.activate([(broken, 1.0)])
    for layer, weight in original_weights(den).items():
        assert torch.equal(weight, before[layer]), layer
    np.testing.assert_array_equal(draw(enc, den, p), base)
    assert differ(draw(enc, den, p, [(style, 1.0)]), base) > 1  # and it still merges


def test_putting_the_adapters_in_place_is_a_stage_of_its_own(lora_family, monkeypatch):
    """What a request's adapters cost before its steps (a merge, a slot copy) is its
    "adapters" stage, before "denoise"; running out of memory there says so."""
    name, enc, den, path = lora_family
    p = replace(FAMILY_PARAMS[name], num_inference_steps=2)
    style = adapters(path / "loras", den)["tiny-style"]
    recorder = StageRecorder(den.device)
    den.generate(p, enc.encode_params(p), recorder=recorder, loras=[(style, 0.85)])
    assert list(recorder.stages)[:2] == ["adapters", "denoise"]
    assert recorder.stages["adapters"].outcome == "ok"

    def out_of_memory(loras):
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    monkeypatch.setattr(den.lora, "activate", out_of_memory)
    with pytest.raises(DoesNotFit) as raised:
        den.generate(p, enc.encode_params(p), loras=[(style, 1.0)])
    assert raised.value.stage == "adapters"
