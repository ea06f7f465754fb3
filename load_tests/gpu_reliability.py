"""Reliability on a GPU: the served full-size Z-Image (random weights) under 1,000 mixed
requests of which 30% leave at random points, an over-large request, and a request let
past admission into a real out-of-memory failure.

    python -m load_tests.gpu_reliability --out load_tests/results     # on a GPU

Two models from one checkpoint: `zimage`, its Denoiser capped at --fraction of the card
(memory.fraction), with the budget the cap gives (admission refuses what the predictor
says will not fit: 413), and `zimage-overcommitted`, capped at 0.8 of that, whose
configured budget is far above its cap, so that a large request gets past admission and
runs out of memory for real: 503, the replica stays in service and serves the next
request. Eager (no compile): this is about memory and faults, not speed.

Recorded: counts by outcome, the Denoiser's allocated memory before and after the load
(from /readyz; back at its baseline within 1%), the card's memory (nvidia-smi), each
answered request's decode-stage peak against the predictor's figure, and the refusals.
Writes <out>/<gpu>-<date>-reliability.json.
"""

import argparse
import asyncio
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from load_tests import traffic
from load_tests.local_service import local_service
from load_tests.measure import CardMemory

SIZES = (("512x512", 5), ("768x768", 3), ("1024x1024", 2))


def kinds() -> list[traffic.Kind]:
    out = []
    for size, weight in SIZES:
        for stream in (False, True):
            steps = 3 if size == "1024x1024" else 4
            name = f"{size}{'-stream' if stream else ''}"
            out.append(
                traffic.Kind(name, "zimage", size, steps, stream, weight * (1 + 2 * (not stream)))
            )
    return out


async def one(http: httpx.AsyncClient, kind: traffic.Kind, leave_after: float | None) -> dict:
    body, started = kind.body(), time.monotonic()
    try:
        async with asyncio.timeout(leave_after):
            r = await http.post(traffic.PATH, json=body)
    except TimeoutError:
        return {"outcome": "left", "kind": kind.name}
    verdict = traffic.judge(r.status_code, r.headers.get("retry-after"), r.content, kind)
    row = {"outcome": verdict.outcome, "kind": kind.name, "status": r.status_code,
           "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    if r.status_code == 200 and not kind.stream:
        row["vram"] = r.json()["vram"]
    return row


async def load(url: str, total: int, concurrency: int, leave_share: float, seed: int) -> list:
    rng = random.Random(seed)
    mix = kinds()
    weights = [k.weight for k in mix]
    plan = [
        (
            rng.choices(mix, weights)[0],
            rng.uniform(0.05, 2.0) if rng.random() < leave_share else None,
        )
        for _ in range(total)
    ]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    rows: list[dict] = []

    async def worker():
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while not queue.empty():
                kind, leave = queue.get_nowait()
                rows.append(await one(http, kind, leave))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rows


def short(r: httpx.Response) -> dict:
    """An answer without its images."""
    body = r.json()
    body.pop("data", None)
    return body


def denoiser_memory(url: str, model: str) -> dict:
    ready = httpx.get(f"{url}/readyz", timeout=30).json()
    den = ready["models"][model]["denoiser"]
    return {"vram": den["vram"], "memory": den["memory"], "queue_depth": den["queue_depth"]}


def predicted_vs_measured(rows: list[dict], memory: dict) -> list[dict]:
    from serve_app import vram
    from serve_app.messages import GenerationParams

    out: dict[str, list[float]] = {}
    for row in rows:
        if "vram" not in row:
            continue
        side = int(row["kind"].split("x")[0])
        params = GenerationParams("x", None, side, side, 4, 0.0, 0)
        predicted = vram.predict("zimage", params, False, memory["resident_bytes"])
        measured = max(row["vram"].get(s, 0) for s in ("denoise", "decode"))
        if not measured:  # a CPU run counts no device memory
            continue
        out.setdefault(row["kind"], []).append((predicted - measured) / measured)
    return [
        {
            "kind": k,
            "n": len(v),
            "median_error": round(statistics.median(v), 4),
            "min_error": round(min(v), 4),
            "max_error": round(max(v), 4),
        }  # fmt: skip
        for k, v in sorted(out.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--leave-share", type=float, default=0.3)
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--tiny", action="store_true", help="the embedded model on the CPU")
    args = parser.parse_args()
    import torch

    from load_tests.checkpoints import save_full_zimage
    from load_tests.measure import device_facts

    device = torch.device("cpu" if args.tiny else "cuda", 0)
    env = device_facts(device)
    path = "tiny" if args.tiny else save_full_zimage(Path(tempfile.gettempdir()) / "full-zimage")
    # Every client's request taken in (the default, 4, would turn most of 16 away).
    base = {"model": str(path), "compile": False, "warmup_sizes": ["512x512"], "lora_dir": None,
            "requests_per_replica": args.concurrency}  # fmt: skip
    models = [
        {**base, "id": "zimage", "memory": {"fraction": args.fraction}},
        {**base, "id": "zimage-overcommitted", "like": "zimage",
         "memory": {"fraction": args.fraction * 0.8, "budget_bytes": 100 * 2**30}},
    ]  # fmt: skip
    out: dict = {"env": env, "args": vars(args) | {"out": str(args.out)}}
    stamp = datetime.date.today().isoformat()
    name = f"{env['gpu'].replace(' ', '-')}-{stamp}-reliability.json"

    def save():
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(json.dumps(out, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        card = CardMemory(device)
        cpus = 4 if args.tiny else None  # the two models' replicas ask for 2.35 CPUs
        with local_service(Path(tmp), models, 1, cpus, ready_timeout_s=900) as svc:
            url = svc.url
            out["ready_s"] = round(svc.ready_s, 1)
            out["before"] = {"denoiser": denoiser_memory(url, "zimage"), "card_mib": card.read()}
            save()
            with httpx.Client(base_url=url, timeout=300) as http:
                big = http.post(traffic.PATH, json={"prompt": "x", "size": "2048x2048",
                                                    "num_inference_steps": 2})  # fmt: skip
                out["over_large"] = {"status": big.status_code, "answer": short(big)}
                oom = http.post(traffic.PATH, json={"model": "zimage-overcommitted", "prompt": "x",
                                                    "size": "2048x2048", "n": 2,
                                                    "num_inference_steps": 2})  # fmt: skip
                after_oom = http.post(traffic.PATH, json={"model": "zimage-overcommitted",
                                                          "prompt": "x", "size": "512x512",
                                                          "num_inference_steps": 2})  # fmt: skip
                out["out_of_memory"] = {
                    "status": oom.status_code,
                    "retry_after": oom.headers.get("retry-after"),
                    "answer": short(oom),
                    "next_request_status": after_oom.status_code,
                    "denoiser_after": denoiser_memory(url, "zimage-overcommitted"),
                }
            save()
            started = time.monotonic()
            with card:
                rows = asyncio.run(
                    load(url, args.requests, args.concurrency, args.leave_share, seed=7)
                )
            took = time.monotonic() - started
            time.sleep(5)  # the last cancelled loops stop, the accounting thread records
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
            out["load"] = {
                "seconds": round(took, 1),
                "counts": counts,
                "card_peak_mib": card.peak_mib,
                "statuses": sorted({r.get("status") for r in rows if "status" in r}),
            }
            out["after"] = {"denoiser": denoiser_memory(url, "zimage"), "card_mib": card.read()}
            b = out["before"]["denoiser"]["vram"]["allocated"]
            a = out["after"]["denoiser"]["vram"]["allocated"]
            out["allocated_back_within_1pct"] = abs(a - b) <= 0.01 * b
            out["predictor"] = predicted_vs_measured(rows, out["before"]["denoiser"]["memory"])
            with httpx.Client(base_url=url, timeout=120) as http:
                later = http.post(traffic.PATH, json={"prompt": "x", "size": "512x512",
                                                      "num_inference_steps": 2})  # fmt: skip
            out["served_after"] = later.status_code
            save()
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
