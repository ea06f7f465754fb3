"""Where an SDXL step's time goes, compiled as served: per (batch, LoRA slots on/off) the
synchronised step time, the time until step() returns to the host (the ancestral noise's
copy to the device waits for the step's kernels, so it is about the whole step), the top
kernels of one profiled step by device time (their sum against the step's wall time says
how long the GPU idles), and Dynamo's graph counts; with PyTorch's SDPA free to pick its
kernel, and with its math fallback forbidden.

    python -m load_tests.probe_sdxl_step --out load_tests/results   # on a GPU

Writes <out>/<gpu>-<date>-sdxl-step-probe.json. Weights are random at the real size.
"""

import argparse
import datetime
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from load_tests.measure import device_facts

PROMPT = "ink wash painting of misty mountains and a lone pine"


def top_kernels(fn, top: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows if e.device_time_total) or 1
    return [
        {"kernel": e.key[:100], "ms": round(e.device_time_total / 1000, 2),
         "share": round(e.device_time_total / total, 3), "calls": e.count}
        for e in rows[:top]
    ]  # fmt: skip


def probe(path: Path, device: torch.device, no_math: bool) -> dict:
    from serve_app.engine import LoraOptions, load_denoiser, load_encoder
    from serve_app.messages import GenerationParams

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    context = nullcontext
    if no_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION]  # fmt: skip
        context = lambda: sdpa_kernel(backends)  # noqa: E731
    out: dict = {"no_math_sdpa": no_math}
    encoder = load_encoder(str(path), str(device))
    den = load_denoiser(str(path), str(device), "auto", compile=True, lora=LoraOptions(1, 64))
    folder = path / "loras"
    adapter = den.read_adapter(sorted(folder.glob("*.safetensors"))[0])
    with context():
        start = time.perf_counter()
        out["warmup_s"] = den.warmup([(1024, 1024)])
        out["warmup_wall_s"] = round(time.perf_counter() - start, 1)
        out["graphs_after_warmup"] = dict(torch._dynamo.utils.counters["stats"])
        for guidance in (0.0, 7.0):
            for name, loras in (("off", []), ("on", [(adapter, 0.85)])):
                p = GenerationParams(PROMPT, None, 1024, 1024, 12, guidance, 0)
                emb = encoder.encode_params(p)
                den.lora.activate(loras)
                totals, launches = [], []
                with torch.no_grad():
                    sampling = den.sampling(p, emb)
                    for i in range(sampling.num_steps - 1):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        sampling.step(i)
                        launched = time.perf_counter()
                        torch.cuda.synchronize()
                        totals.append(time.perf_counter() - start)
                        launches.append(launched - start)
                    last = sampling.num_steps - 1
                    kernels = top_kernels(lambda s=sampling, i=last: s.step(i))
                key = f"batch{2 if guidance else 1}_slots_{name}"
                out[key] = {
                    "step_ms": round(statistics.median(totals[1:]) * 1000, 2),
                    "host_return_ms": round(statistics.median(launches[1:]) * 1000, 2),
                    "top_kernels": kernels,
                }
                print(key, out[key]["step_ms"], out[key]["host_return_ms"], flush=True)
                print("  ", [(k["kernel"][:60], k["ms"]) for k in kernels[:5]], flush=True)
    out["graphs_at_end"] = dict(torch._dynamo.utils.counters["stats"])
    den.lora.activate([])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/sdxl-full-random"))
    args = parser.parse_args()
    from load_tests.bench_families import Families
    from load_tests.checkpoints import save_full_sdxl

    device = torch.device("cuda")
    path = save_full_sdxl(args.checkpoint)
    adapters = Families.__new__(Families)  # only its adapter writer, at the bench's rank
    adapters.rank = 32
    adapters.sdxl_adapters(path, path / "loras")
    result = {"env": device_facts(device)}
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = result["env"]["gpu"].replace(" ", "-")
    file = args.out / f"{gpu}-{datetime.date.today().isoformat()}-sdxl-step-probe.json"
    for no_math in (False, True):
        result[f"no_math_{no_math}"] = probe(path, device, no_math)
        file.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
