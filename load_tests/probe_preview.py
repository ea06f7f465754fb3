"""What a streamed preview costs at 1024x1024, for both families: the denoiser's part (the
latents' linear map to RGB and the copy to the host, between two steps) against one
eager SDXL UNet step with guidance (batch 2) on the same card, and the ingress's part
(resizing to the image's size, PNG, base64) on the host.

    python -m load_tests.probe_preview --out load_tests/results   # on a GPU

Writes <out>/<gpu>-<date>-preview-probe.json. Weights are random at the real sizes.
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from load_tests.measure import Timer, device_facts, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet step (a CPU check)")
    args = parser.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from load_tests.checkpoints import FULL, SDXL, _fill
    from serve_app.engine.denoiser import fit_preview_map, preview_pixels
    from serve_app.engine.sdxl import SDXLDenoiser
    from serve_app.engine.sdxl import tiny as sdxl_tiny
    from serve_app.engine.zimage import ZImageDenoiser
    from serve_app.ingress.streaming import partial_image
    from serve_app.messages import GenerationParams, Preview

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)
    out: dict = {"env": device_facts(device), "size": "1024x1024"}
    vaes = {
        "zimage": (FULL["vae"], ZImageDenoiser, 16),
        "sdxl": (sdxl_tiny.vae_config([128, 256, 512, 512], 2, 32), SDXLDenoiser, 4),
    }
    params = GenerationParams("x", None, 1024, 1024, 9, 0.0, 0)
    for family, (config, cls, channels) in vaes.items():
        with torch.device("meta"):
            vae = AutoencoderKL(**config)
        vae = _fill(vae.to_empty(device=device)).to(dtype).eval()
        owner = SimpleNamespace(vae=vae)
        start = time.perf_counter()
        weights = fit_preview_map(
            vae, lambda z, o=owner, c=cls: c.to_vae(o, z), channels, 8, device
        )
        fit_s = time.perf_counter() - start
        latents = torch.randn(1, channels, 128, 128, device=device, dtype=dtype)
        preview_pixels(latents, weights)
        times: list[float] = []
        for _ in range(20):
            with timer(times):
                pixels = preview_pixels(latents, weights)
        host: list[float] = []
        for _ in range(5):
            start = time.perf_counter()
            partial_image(Preview(0, 4, pixels), params, "png", None)
            host.append(time.perf_counter() - start)
        out[family] = {
            "fit_map_s": round(fit_s, 3),
            "preview_on_device": summary(times),
            "preview_pixels": list(pixels.shape),
            "partial_image_at_ingress": summary(host),
        }
        print(family, out[family], flush=True)
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.no_unet:
        return
    # One eager SDXL UNet step at 1024x1024 with guidance, for scale.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL["unet"])
    unet = _fill(unet.to_empty(device=device)).to(dtype).eval()
    x = torch.randn(2, 4, 128, 128, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    cond = {
        "encoder_hidden_states": torch.randn(2, 77, 2048, device=device, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor(
                [[1024, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype
            ),
        },
    }
    steps: list[float] = []
    with torch.no_grad():
        for _ in range(6):
            with timer(steps):
                unet(x, t, **cond, return_dict=False)
    out["sdxl_unet_eager_step_cfg"] = summary(steps[1:])
    step_ms = statistics.median(steps[1:]) * 1000
    for family in vaes:
        share = out[family]["preview_on_device"]["p50_ms"] / step_ms
        out[family]["preview_share_of_eager_sdxl_step"] = round(share, 4)
    print(out, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = out["env"]["gpu"].replace(" ", "-")
    day = datetime.date.today().isoformat()
    (args.out / f"{gpu}-{day}-preview-probe.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
