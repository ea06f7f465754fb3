"""The device memory one request takes beyond the loaded model, on a GPU, for the
predictor the ingress admits requests by (serve_app/vram.py, fitted by
load_tests/fit_vram.py from this script's output).

    python -m load_tests.measure_vram --out load_tests/results     # on a GPU

For each family (full-size random weights, load_tests/checkpoints.py, loaded as the
replicas load them, eager), each case (size, images, guidance, an adapter): the peak of
torch.cuda.max_memory_allocated over one generation minus what was allocated before it,
and what the allocator reserved beyond what it held before. The step count does not
change the peak (load_tests/results/*sdxl-2.json: flat in steps), so each case runs 2.

Then the out-of-memory path as the Denoiser meets it: the process capped
(torch.cuda.set_per_process_memory_fraction) below what a large request needs; the
request must fail with DoesNotFit, leave memory_allocated where it was, and a small
request after it must succeed.

Writes <out>/<gpu>-<date>-vram.json.
"""

import argparse
import datetime
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from load_tests.measure import device_facts

SIZES = (512, 768, 1024, 1280, 1536, 2048)
GUIDANCE = {"zimage": 5.0, "sdxl": 7.0}
RANK = 32


def adapter_file(family: str, checkpoint: Path, folder: Path) -> Path:
    """A random rank-32 adapter on the layers the benchmark adapts, saved by diffusers,
    drawn for the model's layers as the checkpoint has them (on the meta device)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers import ZImageTransformer2DModel

    from load_tests.bench_families import SDXL_ADAPTED, ZIMAGE_ADAPTED
    from serve_app.engine.tiny import random_lora

    cls, sub = (
        (ZImageTransformer2DModel, "transformer")
        if family == "zimage"
        else (UNet2DConditionModel, "unet")
    )
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(checkpoint, subfolder=sub))
    targets = ZIMAGE_ADAPTED if family == "zimage" else SDXL_ADAPTED
    state, config = random_lora(model, targets, RANK, RANK, 0, 0.01, torch.bfloat16)
    if family == "zimage":
        from diffusers.loaders import ZImageLoraLoaderMixin as Mixin

        kwargs = {"transformer_lora_layers": state, "transformer_lora_adapter_metadata": config}
    else:
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Mixin

        kwargs = {"unet_lora_layers": state, "unet_lora_adapter_metadata": config}
    Mixin.save_lora_weights(folder, weight_name="style.safetensors", **kwargs)
    return folder / "style.safetensors"


def cases() -> list[tuple[int, int, bool, bool]]:
    """(side, images, guided, adapter): every size alone, guided or not; images 2 and 4
    and an adapter at the sizes people use."""
    out = [(side, 1, guided, False) for side in SIZES for guided in (False, True)]
    for guided in (False, True):
        out += [(side, n, guided, False) for side in (768, 1024) for n in (2, 4)]
    out += [(side, 1, guided, True) for side in (768, 1024, 1280) for guided in (False, True)]
    return out


def measure(family: str, path: Path, device: torch.device, workdir: Path) -> dict:
    from serve_app.engine import LoraOptions, load_denoiser, load_encoder
    from serve_app.engine.precision import weights_bytes
    from serve_app.errors import DoesNotFit
    from serve_app.messages import GenerationParams

    encoder = load_encoder(str(path), str(device))
    prompt = "a lighthouse at dusk"
    embeddings = {
        guided: encoder.encode_params(
            GenerationParams(prompt, None, 512, 512, 2, GUIDANCE[family] * guided, 0)
        )
        for guided in (False, True)
    }
    encoder = None
    gc.collect()
    torch.cuda.empty_cache()
    lora = LoraOptions(slots=1, max_rank=64)
    denoiser = load_denoiser(str(path), str(device), "auto", "native", False, lora=lora)
    adapter = denoiser.read_adapter(adapter_file(family, path, workdir))
    torch.cuda.synchronize()
    loaded = {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "weights": weights_bytes(denoiser.modules),
        "adapter": adapter.nbytes,
    }
    rows = []
    for side, n, guided, with_adapter in cases():
        params = GenerationParams(
            "x", None, side, side, 2, GUIDANCE[family] if guided else 0.0, 0, n
        )
        loras = [(adapter, 0.85)] if with_adapter else []
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        reserved_before = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        row = {"side": side, "images": n, "guided": guided, "adapter": with_adapter}
        start = time.perf_counter()
        try:
            denoiser.generate(params, embeddings[guided], loras=loras)
            torch.cuda.synchronize()
            row["extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
            row["reserved_growth_bytes"] = torch.cuda.max_memory_reserved(device) - reserved_before
        except DoesNotFit as exc:
            row["does_not_fit"] = str(exc)
        row["seconds"] = round(time.perf_counter() - start, 3)
        row["allocated_after_bytes"] = torch.cuda.memory_allocated(device)
        rows.append(row)
        print(family, row, flush=True)
    try:
        probe = oom_probe(denoiser, embeddings, device)
    except Exception as exc:  # noqa: BLE001 - recorded: the measurements above still count
        probe = {"error": repr(exc)}
    out = {"loaded": loaded, "cases": rows, "oom": probe}
    denoiser = adapter = None
    gc.collect()
    torch.cuda.empty_cache()
    return out


def oom_probe(denoiser, embeddings, device: torch.device) -> dict:
    """Cap the process below a 2048x2048 x2 guided request's need; it must fail cleanly
    and a 512x512 one after it must succeed; then lift the cap."""
    from serve_app.errors import DoesNotFit
    from serve_app.messages import GenerationParams

    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    before = torch.cuda.memory_allocated(device)
    cap = before + 2 * 2**30  # 2 GiB beyond the model: too little for the large request
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    out: dict = {"cap_bytes": cap, "allocated_before_bytes": before}
    try:
        big = GenerationParams("x", None, 2048, 2048, 2, 5.0, 0, 2)
        try:
            denoiser.generate(big, embeddings[True])
            out["large"] = "succeeded (the cap was not low enough)"
        except DoesNotFit as exc:
            out["large"] = f"DoesNotFit: {exc}"
        torch.cuda.synchronize()
        out["allocated_after_bytes"] = torch.cuda.memory_allocated(device)
        small = GenerationParams("x", None, 512, 512, 2, 0.0, 0)
        [pixels] = denoiser.generate(small, embeddings[False])
        out["small_after"] = f"ok {pixels.shape}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    out["allocated_back_within_1pct"] = abs(out["allocated_after_bytes"] - before) <= 0.01 * before
    print("oom probe", out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", nargs="+", default=["zimage", "sdxl"])
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from load_tests.checkpoints import save_full_sdxl, save_full_zimage

    device = torch.device("cuda", torch.cuda.current_device())
    result: dict = {"env": device_facts(device), "families": {}}
    save = {"zimage": save_full_zimage, "sdxl": save_full_sdxl}
    stamp = datetime.date.today().isoformat()
    name = f"{result['env']['gpu'].replace(' ', '-')}-{stamp}-vram.json"
    for family in args.families:
        path = save[family](args.checkpoints / f"full-{family}")
        with tempfile.TemporaryDirectory() as tmp:
            result["families"][family] = measure(family, path, device, Path(tmp))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(json.dumps(result, indent=1))
    print("wrote", args.out / name)


if __name__ == "__main__":
    main()
