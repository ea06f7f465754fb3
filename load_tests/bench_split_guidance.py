"""Split guidance (issue 16, part 2), for `python -m load_tests.bench_multi_gpu
--split-guidance`: one guided Z-Image request's latency on one GPU and with
classifier-free guidance split over two (options.split_guidance,
serve_app/engine/split_guidance.py), engine-level in one process (no Ray), and the split
image's equivalence to the one-GPU image for the same seed.

The request: the bench's prompt and negative prompt (load_tests/bench_gpu.py), 1024x1024,
9 steps (the turbo preset's), guidance 5, seed 0, on the full-size random-weight
checkpoint; `tiny`: the tiny model at 256x256 and 2 steps. The prompt is encoded once,
and its encoder freed; each engine is loaded and warmed up as a replica is (compiled
where on CUDA), then runs the request `runs` + 1 times, the first not counted. Latency:
the Denoiser's generate (denoising and decoding, pixels on the host), which the split
changes; the encoding before it would be the same either way. One engine at a time on
the cards: the one-GPU engine is freed before the split one loads.

Without two CUDA devices the phase is skipped, its reason recorded; on a machine without
CUDA, `tiny` runs both copies on the CPU (the smoke run: it checks what is written,
never how fast).
"""

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from load_tests.bench_precision import relative_l2
from load_tests.loadtest import percentiles
from load_tests.measure import free_memory, image_difference

REQUEST = {"width": 1024, "height": 1024, "steps": 9, "guidance": 5.0}
TINY_REQUEST = {"width": 256, "height": 256, "steps": 2, "guidance": 5.0}
# Issue 16's target: guidance-5 latency on 2 GPUs at most this times one GPU's.
TARGET_RATIO = 0.6


def skip_reason(cuda_devices: int, tiny: bool) -> str | None:
    """Why the phase cannot run here, or None: two CUDA devices, or (the smoke run) the
    tiny model on a machine without CUDA."""
    if cuda_devices >= 2 or (cuda_devices == 0 and tiny):
        return None
    return f"split guidance needs 2 CUDA devices; {cuda_devices} visible here"


def measure(checkpoint: Path, runs: int, tiny: bool, log: Callable[..., None]) -> dict:
    """The phase's section of the results file (see the module's docstring).

    Args:
        checkpoint: the Z-Image checkpoint folder.
        runs: the request's measured runs per engine.
        tiny: the smoke run's request (TINY_REQUEST) instead of REQUEST.
        log: the bench's logger.
    """
    from load_tests.bench_gpu import NEGATIVE, PROMPT
    from serve_app.engine import load_encoder
    from serve_app.messages import GenerationParams

    request = TINY_REQUEST if tiny else REQUEST
    out: dict = {
        "request": {**request, "seed": 0, "negative_prompt": NEGATIVE},
        "runs": runs,
        "target_ratio": TARGET_RATIO,
        "skipped": skip_reason(torch.cuda.device_count(), tiny),
    }
    if out["skipped"]:
        log("split guidance skipped:", out["skipped"])
        return out
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    params = GenerationParams(
        PROMPT, NEGATIVE, request["width"], request["height"], request["steps"],
        request["guidance"], 0,
    )  # fmt: skip
    encoder = load_encoder(str(checkpoint), device)
    embeddings = {k: v.cpu() for k, v in encoder.encode_params(params).items()}
    encoder = None
    free_memory(torch.device(device))
    images, latents = {}, {}
    for name, options in (("one_gpu", {}), ("split", {"split_guidance": True})):
        out[name], images[name], latents[name] = engine_runs(
            checkpoint, device, options, params, embeddings, runs
        )
        log("split guidance", name, out[name])
    one, split = out["one_gpu"]["latency"], out["split"]["latency"]
    out["ratio_p50"] = round(split["p50_ms"] / one["p50_ms"], 3)
    out["ratio_p95"] = round(split["p95_ms"] / one["p95_ms"], 3)
    out["meets_target"] = out["ratio_p50"] <= TARGET_RATIO
    out["equivalence"] = {
        **image_difference(images["split"], images["one_gpu"]),
        "latents_rel_l2": relative_l2(latents["split"], latents["one_gpu"]),
    }
    log("split guidance: ratio", out["ratio_p50"], "equivalence", out["equivalence"])
    return out


def engine_runs(
    checkpoint: Path, device: str, options: dict, params, embeddings: dict, runs: int
) -> tuple[dict, np.ndarray, torch.Tensor]:
    """One engine loaded and warmed up, then `params` `runs` + 1 times: its figures, the
    last image and its final latents."""
    from load_tests.bench_gpu import Bench
    from load_tests.measure import peak_bytes, peak_reset
    from serve_app.engine import load_denoiser
    from serve_app.engine.stages import StageRecorder

    torch._dynamo.reset()  # nothing compiled for the previous engine is reused
    start = time.perf_counter()
    den = load_denoiser(str(checkpoint), device, options=options, compile="auto")
    loaded = time.perf_counter() - start
    warmup = den.warmup([(params.width, params.height)])
    devices = [den.device] + ([den.split.device] if den.split is not None else [])
    kept: dict = {}
    Bench.keep_latents(den, kept, "final")
    for d in devices:
        peak_reset(d)
    latencies, steps = [], []
    for run in range(runs + 1):
        recorder = StageRecorder(den.device)
        began = time.perf_counter()
        [image] = den.generate(params, embeddings, recorder=recorder)
        if run:
            latencies.append(time.perf_counter() - began)
            steps += recorder.step_seconds
    figures = {
        "devices": [str(d) for d in devices],
        "load_s": round(loaded, 1),
        "warmup_s": warmup,
        "latency": percentiles(latencies),
        "step_ms_p50": round(statistics.median(steps) * 1000, 2),
        "stages_ms": recorder.timings_ms(),
        "peak_allocated_bytes": {str(d): peak_bytes(d) for d in devices if d.type == "cuda"},
    }
    den = None
    free_memory(torch.device(device))
    return figures, image, kept["final"]


def markdown(section: dict) -> list[str]:
    """The report's section on split guidance."""
    r = section["request"]
    lines = [
        "",
        f"## Split guidance: Z-Image {r['width']}x{r['height']}, {r['steps']} steps, "
        f"guidance {r['guidance']}",
        "",
    ]
    if section["skipped"]:
        return lines + [f"Skipped: {section['skipped']}."]
    lines += [
        f"Engine-level, one process; the Denoiser's generate (denoise + decode), "
        f"{section['runs']} runs after a warm-up.",
        "",
        "| engine | devices | p50 ms | p95 ms | step p50 ms | load s | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("one_gpu", "split"):
        e = section[name]
        lines.append(
            f"| {name} | {' + '.join(e['devices'])} | {e['latency']['p50_ms']} "
            f"| {e['latency']['p95_ms']} | {e['step_ms_p50']} | {e['load_s']} "
            f"| {round(sum(e['warmup_s'].values()), 1)} |"
        )
    eq = section["equivalence"]
    verdict = "met" if section["meets_target"] else "not met"
    return lines + [
        "",
        f"Split / one GPU: p50 {section['ratio_p50']}x, p95 {section['ratio_p95']}x "
        f"(target <= {section['target_ratio']}x: {verdict}).",
        "",
        f"Split image against the one-GPU image: max {eq['max_abs']} / mean "
        f"{eq['mean_abs']} levels, PSNR {eq['psnr_db']} dB (None: identical); final "
        f"latents' relative L2 {eq['latents_rel_l2']:.3g}.",
    ]
