"""What the served path costs apart from the model, piece by piece, on this host:

- PNG + base64 of a 1024x1024 and a 768x768 image of gradients under noise (it deflates
  about as the random-weight VAE's output does) for several strip sizes and thread
  counts of serve_app/imaging.py (`--no-png` skips these);
- Ray Serve alone (no model): a 1-byte and a 3.6 MB answer through the HTTP proxy, and
  a handle call answering 3 MB of pixels, unary and after 10 streamed progress events;
  without throughput mode, with it for the replicas only, and with it for the whole
  cluster (proxy included), where the handle calls are timed by reference (Ray's object
  store) too. Each call records the transport it used (`by_reference`): handles made by
  a driver outside throughput mode go by reference even to replicas in throughput mode.

    python -m load_tests.probe_served --out DIR      (writes DIR/probe-served.json)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "134217728",
}


def median_ms(fn, runs: int = 30, warmup: int = 3) -> float:
    times = []
    for i in range(runs + warmup):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def png_sweep() -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import pybase64

    from serve_app import imaging

    rng = np.random.default_rng(0)
    out = {}
    for side in (1024, 768):
        # Gradients under noise: deflates to about what the random-weight VAE's images
        # do (2.68 of 3.15 MB at 1024x1024, results/*levers-2.json); pure noise would
        # be stored, not compressed, and time something else.
        ramp = np.linspace(0, 200, side)[None, :, None] + np.linspace(0, 50, side)[:, None, None]
        noise = rng.normal(0, 16, (side, side, 3))
        pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
        out[f"{side} deflated MB"] = round(len(imaging.encode_png(pixels)) / 1e6, 3)
        for threads in (4, 8, 16):
            for strip_kib in (128, 256, 512):
                imaging.STRIP_THREADS, imaging.STRIP_BYTES = threads, strip_kib * 1024
                imaging._strips = ThreadPoolExecutor(threads)
                out[f"{side} threads={threads} strip={strip_kib}KiB"] = {
                    "png_ms": median_ms(lambda p=pixels: imaging.encode_png(p)),
                    "png_b64_ms": median_ms(
                        lambda p=pixels: pybase64.b64encode(imaging.encode_png(p))
                    ),
                }
    return out


def serve_child(mode: str) -> dict:
    """Runs in a fresh process: the cluster's environment is fixed at ray.init."""
    if mode == "cluster":
        os.environ.update(SERVE_ENV)
    replica_env = {"runtime_env": {"env_vars": SERVE_ENV}} if mode != "none" else {}
    import asyncio

    import httpx
    import ray
    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options=replica_env)
    class Model:
        def __init__(self):
            self.pixels = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8)

        async def small(self):
            return 1

        async def pixels_unary(self):
            return [self.pixels]

        async def pixels_stream(self):
            for i in range(10):
                yield i
                await asyncio.sleep(0)
            yield [self.pixels]

    @serve.deployment(ray_actor_options=replica_env)
    @serve.ingress(app)
    class Edge:
        def __init__(self, model):
            self.model = model
            self.body = os.urandom(3_600_000)

        @app.get("/small")
        async def small(self):
            return Response(b"x")

        @app.get("/big")
        async def big(self):
            return Response(self.body)

        @app.get("/hop/{kind}")
        async def hop(self, kind: str, by_reference: bool | None = None):
            model = (
                self.model
                if by_reference is None
                else self.model.options(_by_reference=by_reference)
            )
            times, by_ref = [], None
            for i in range(33):
                start = time.perf_counter()
                if kind == "stream":
                    call = model.options(stream=True).pixels_stream.remote()
                    async for _ in call:
                        pass
                else:
                    call = getattr(model, kind).remote()
                    await call
                by_ref = call.by_reference  # the transport this call used
                if i >= 3:
                    times.append(time.perf_counter() - start)
            return {"ms": round(statistics.median(times) * 1000, 3), "by_reference": by_ref}

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.run(Edge.bind(Model.bind()))
    result = {}
    with httpx.Client(base_url="http://127.0.0.1:8000", timeout=60) as http:
        for path in ("/small", "/big"):
            get = lambda p=path: http.get(p).content  # noqa: E731
            result[f"proxy {path}"] = median_ms(get, runs=50, warmup=5)
        for kind in ("small", "pixels_unary", "stream"):
            result[f"handle {kind}"] = http.get(f"/hop/{kind}").json()
            if mode == "cluster":  # the same calls by reference, as the service now does
                result[f"handle {kind}, by reference"] = http.get(
                    f"/hop/{kind}", params={"by_reference": "true"}
                ).json()
    serve.shutdown()
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-png", action="store_true", help="Ray Serve's hops only")
    parser.add_argument("--child", choices=["none", "replicas", "cluster"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(serve_child(args.child)))
        return
    result = {"cpus": os.cpu_count(), "png": {} if args.no_png else png_sweep()}
    print(json.dumps(result["png"], indent=1), flush=True)
    for mode in ("none", "replicas", "cluster"):
        done = subprocess.run(
            [sys.executable, "-m", "load_tests.probe_served", "--out", ".", "--child", mode],
            capture_output=True,
            text=True,
        )
        lines = done.stdout.strip().splitlines()
        result[f"serve, throughput mode for the {mode}"] = (
            json.loads(lines[-1]) if done.returncode == 0 and lines else done.stderr[-3000:]
        )
        print(mode, result[f"serve, throughput mode for the {mode}"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe-served.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
