"""CPU each request costs the serving path (Ray's proxy, the Ingress, InFlight, Serve's
controller), by kind of request, against the embedded default started here: what bounds
the request rate one ingress replica and one InFlight take (docs/scaling.md).

Kinds: `health` (GET /healthz), `invalid` (a body refused with 400 before admission),
`accepted` (a small image drawn and answered: the engine's CPU is under Denoiser-zimage),
`refused` (429: the model's admission is full, held by long requests started first).
CPU is the processes' user + system time over the requests, from /proc (psutil), less
what each spends idle (measured first: Serve's controller and the replicas have
background work) over the same time.

    .venv/bin/python -m load_tests.request_cost --out load_tests/results/cpu-DATE-request-cost.json
"""

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from load_tests.local_service import local_service
from load_tests.traffic import PATH

ROLES = ("ProxyActor", "Ingress", "InFlight", "ServeController", "Denoiser-zimage")
SMALL = {"model": "zimage", "prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 4}
IDLE_S = 20.0
LONG = {"model": "zimage", "prompt": "held", "size": "1024x1024", "num_inference_steps": 60}


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of the serving processes, by role."""
    seconds = dict.fromkeys(ROLES, 0.0)
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for role in ROLES:
            if f"ray::{role}" in cmd or f":{role}" in cmd:
                try:
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                seconds[role] += t.user + t.system
    return seconds


async def measure(client: httpx.AsyncClient, url: str, kind: str, n: int, conc: int) -> dict:
    async def one(sem, latencies, statuses):
        async with sem:
            started = time.perf_counter()
            if kind == "health":
                answer = await client.get(f"{url}/healthz")
            else:
                body = {**SMALL, "size": "255x255"} if kind == "invalid" else SMALL
                answer = await client.post(f"{url}{PATH}", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    sem, latencies, statuses = asyncio.Semaphore(conc), [], {}
    before, started = cpu_seconds(), time.monotonic()
    await asyncio.gather(*[one(sem, latencies, statuses) for _ in range(n)])
    after, took = cpu_seconds(), time.monotonic() - started
    latencies.sort()
    return {
        "requests": n,
        "concurrency": conc,
        "statuses": statuses,
        "latency_p50_ms": round(statistics.median(latencies), 1),
        "latency_p95_ms": round(latencies[int(0.95 * (n - 1))], 1),
        "cpu_ms_per_request": {
            r: round((after[r] - before[r] - IDLE[r] * took) * 1000 / n, 2) for r in ROLES
        },
    }


# CPU seconds a second each role spends with no requests (set by `run`).
IDLE = dict.fromkeys(ROLES, 0.0)


async def run(url: str, n: int, conc: int, hold: int) -> dict:
    before = cpu_seconds()
    await asyncio.sleep(IDLE_S)
    after = cpu_seconds()
    IDLE.update({r: (after[r] - before[r]) / IDLE_S for r in ROLES})
    results = {"idle_cpu_per_s": {r: round(IDLE[r], 4) for r in ROLES}}
    async with httpx.AsyncClient(timeout=600) as client:
        for kind in ("health", "invalid"):
            results[kind] = await measure(client, url, kind, n, conc)
        # Fewer: each is drawn (at ~2/s here).
        results["accepted"] = await measure(client, url, "accepted", max(n // 5, 1), conc)
        # Fill zimage's admission (requests_per_replica, 4 in the embedded default) with
        # long requests, then every small one is refused.
        held = [asyncio.create_task(client.post(f"{url}{PATH}", json=LONG)) for _ in range(hold)]
        await asyncio.sleep(3)
        results["refused"] = await measure(client, url, "refused", n, conc)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="per kind")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--hold", type=int, default=6, help="long requests that fill admission")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d, local_service(Path(d), None, 1, 4, 1) as svc:
        time.sleep(5)  # let the start-up's own work settle
        results = asyncio.run(run(svc.url, args.requests, args.concurrency, args.hold))
    report = {
        "host": {"cpus": psutil.cpu_count(), "machine": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kinds": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
