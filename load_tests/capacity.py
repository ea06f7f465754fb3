"""How many Denoiser GPUs (and 8-GPU nodes) a request rate needs at a latency SLO, from a
GPU benchmark's measured figures (docs/scaling.md explains the model).

Each Denoiser replica draws one request at a time: `service_s` is a request's served
latency alone (the bench's single-client p50 over HTTP), `per_replica_rps` the images/s
one replica sustains saturated (the bench's concurrency sweep). Requests arrive at random
(Poisson); the wait for a replica is taken from the M/M/c queue (Erlang C), which
overstates it for the near-constant generation times of one configuration, so the counts
err on the side of more GPUs.

    .venv/bin/python -m load_tests.capacity \\
        load_tests/results/NVIDIA-H200-2026-11-26-bench-7.json --slo 2 5 10
"""

import argparse
import json
import math
from pathlib import Path

# Denoiser cards of one node in deploy/serve_config.multi_gpu.yaml (card 0: encoders).
DENOISERS_PER_NODE = 7


def erlang_c(replicas: int, offered: float) -> float:
    """Probability that a request waits (all `replicas` busy), `offered` = rate x mean
    service time (Erlangs); 1 when the replicas cannot keep up."""
    if offered >= replicas:
        return 1.0
    # The Erlang B recursion, then C from B: stable for thousands of replicas.
    b = 1.0
    for k in range(1, replicas + 1):
        b = offered * b / (k + offered * b)
    rho = offered / replicas
    return b / (1 - rho + rho * b)


def latency_quantile(
    rate: float, replicas: int, service_s: float, per_replica_rps: float, q: float
) -> float:
    """The q-quantile of a request's latency (wait + service); inf when overloaded."""
    capacity = replicas * per_replica_rps
    if rate >= capacity:
        return math.inf
    waits = erlang_c(replicas, rate / per_replica_rps)
    # P(wait > t) = C exp(-(c mu - lambda) t)
    wait = max(0.0, math.log(waits / (1 - q)) / (capacity - rate)) if waits > 1 - q else 0.0
    return service_s + wait


def replicas_for(
    rate: float, slo_s: float, service_s: float, per_replica_rps: float, q: float = 0.95
) -> int | None:
    """The fewest Denoiser replicas that keep the q-quantile latency within `slo_s` at
    `rate` requests/s; None if none can (the SLO is below one generation's time)."""
    if service_s > slo_s:
        return None
    replicas = max(1, math.ceil(rate / per_replica_rps))
    while latency_quantile(rate, replicas, service_s, per_replica_rps, q) > slo_s:
        replicas += 1
    return replicas


def measured(bench: dict, config: str) -> tuple[float, float]:
    """(service_s, per_replica_rps) of `config` in a bench results file: the served
    single-request p50, and the best images/s of the concurrency sweep (run at
    1024-turbo; for another configuration scaled by the ratio of the two single-request
    latencies, the GPU being the same)."""
    service_s = bench["service"][config]["e2e"]["p50_ms"] / 1000
    swept = max(point["images_per_s"] for point in bench["throughput"].values())
    at_1024 = bench["service"]["1024-turbo"]["e2e"]["p50_ms"] / 1000
    return service_s, swept * at_1024 / service_s


def table(service_s: float, per_replica_rps: float, rates: list[float], slos: list[float]) -> str:
    rows = [
        "| requests/s | " + " | ".join(f"p95 <= {s:g} s: GPUs (nodes)" for s in slos) + " |",
        "|---|" + "---|" * len(slos),
    ]
    for rate in rates:
        cells = []
        for slo in slos:
            n = replicas_for(rate, slo, service_s, per_replica_rps)
            cells.append("-" if n is None else f"{n} ({math.ceil(n / DENOISERS_PER_NODE)})")
        rows.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", type=Path, nargs="?", help="a GPU benchmark's results JSON")
    p.add_argument("--service-ms", type=float, help="instead of a bench: one request alone")
    p.add_argument("--images-per-s", type=float, help="instead of a bench: one replica, saturated")
    p.add_argument("--config", default="1024-turbo", help="which of its configurations")
    p.add_argument("--slo", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    p.add_argument("--rates", type=float, nargs="+", default=[1, 5, 10, 50, 100, 500])
    args = p.parse_args(argv)
    if args.bench is not None:
        service_s, per_replica_rps = measured(json.loads(args.bench.read_text()), args.config)
        source = f"{args.bench.name} {args.config}"
    elif args.service_ms and args.images_per_s:
        service_s, per_replica_rps, source = args.service_ms / 1000, args.images_per_s, "given"
    else:
        p.error("give a bench results file, or --service-ms and --images-per-s")
    print(f"{source}: a request alone {service_s * 1000:.0f} ms, "
          f"one replica saturated {per_replica_rps:.3f} images/s\n")  # fmt: skip
    print(table(service_s, per_replica_rps, args.rates, args.slo))


if __name__ == "__main__":
    main()
