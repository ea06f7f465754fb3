"""Side-by-side GPU benchmark: stock diffusers vs our engine vs the served app.

In one run on one GPU, for each configuration (the Z-Image preset 1024x1024, 9 steps,
guidance 0; 768x768; 1280x1280; guidance 5):
  (a) stock diffusers ZImagePipeline: its own prompt encoding + pipeline call + PIL image,
  (b) our engine called directly: encode + step loop + decode to pixels,
  (c) the full service through HTTP (Ray Serve, single-GPU layout), PNG out,
each with end-to-end p50/p90 over --runs runs after a warm-up, per-stage times, median
step time, peak VRAM and MFU; for (c) also images/s at 1, 4 and 16 concurrent clients.
And (the `sweep` phase, on the engine phase's engine when it runs right after it) our
engine over steps 10/25/50 x guidance 0/5 x 768/1024/1280: latency and peak VRAM, with a
plot. Then SDXL and the adapters' costs of both families (load_tests/bench_families.py:
the `sdxl` and `lora` phases). Writes <out>/<gpu>-<date>.json and .md, and prints
the ratios (b)/(a) and (c)/(a).

    python -m load_tests.bench_gpu --out load_tests/results              # on a GPU
    python -m load_tests.bench_gpu --tiny --runs 1 --out /tmp/bench       # anywhere (smoke)

Weights are random at the real sizes (load_tests/checkpoints.py): speed and memory
depend on the architecture, not on the values.
"""

import argparse
import asyncio
import base64
import concurrent.futures
import datetime
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from load_tests.measure import (
    CardMemory,
    ForwardTimes,
    Timer,
    device_facts,
    free_memory,
    git_commit,
    image_difference,
    matmul_tflops,
    peak_bytes,
    peak_reset,
    png_pixels,
    summary,
    timed_method,
    transformer_flops,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (
    "a red vintage steam train opening a giant zipper in the winter snow, revealing spring "
    "meadows beneath, poster, detailed, warm light"
)
NEGATIVE = "blurry, low quality"
CONFIGS = [
    {"name": "1024-turbo", "width": 1024, "height": 1024, "steps": 9, "guidance": 0.0},
    {"name": "768-turbo", "width": 768, "height": 768, "steps": 9, "guidance": 0.0},
    {"name": "1280-turbo", "width": 1280, "height": 1280, "steps": 9, "guidance": 0.0},
    {"name": "1024-guidance5", "width": 1024, "height": 1024, "steps": 9, "guidance": 5.0},
]
CONCURRENCY = (1, 4, 16)
# Phases on the Z-Image checkpoint; `sdxl` and `lora` (load_tests/bench_families.py)
# bring their own models.
ZIMAGE_PHASES = (
    "levers", "reference", "stock", "engine", "sweep", "service", "restart", "fp8_eager",
    "fp8", "profile_24gb",
)  # fmt: skip


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.configs = [c for c in CONFIGS if not args.only or c["name"] in args.only]
        if args.tiny:  # small sizes so the smoke run is quick on a CPU
            self.configs = [
                {**c, "width": c["width"] // 4, "height": c["height"] // 4, "steps": 2}
                for c in self.configs
                if c["width"] == 1024
            ]
        self.timer = Timer(self.device)
        self.started = time.monotonic()
        self.result: dict = {"configs": self.configs, "runs": args.runs}
        self.loaded = None  # (encoder, denoiser) of the engine phase, kept for the sweep
        # Each path's image of seed 0 by config name (and the engine's final latents),
        # for the equivalence checks (load_tests/bench_precision.py).
        self.images: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        self.latents: dict[str, torch.Tensor] = {}
        # Compiled graphs of this run: empty at first unless --compile-cache names an
        # earlier run's, so the engine phase compiles cold and the service starts warm.
        self.compile_cache = args.compile_cache or Path(tempfile.mkdtemp(prefix="compile-"))

    # --- bookkeeping ----------------------------------------------------------------

    def log(self, *parts) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s]", *parts, flush=True)

    def stem(self) -> Path:
        gpu = self.result["env"]["gpu"].replace(" ", "-")
        day = datetime.date.today().isoformat()
        self.args.out.mkdir(parents=True, exist_ok=True)
        return self.args.out / f"{gpu}-{day}{self.args.tag}"

    def save(self) -> Path:
        from load_tests.bench_precision import equivalence

        self.result["equivalence"] = equivalence(self.images, self.latents, self.result)
        stem = self.stem()
        stem.with_suffix(".json").write_text(json.dumps(self.result, indent=2))
        stem.with_suffix(".md").write_text(markdown(self.result))
        return stem

    def free(self) -> None:
        free_memory(self.device)

    # --- setup ------------------------------------------------------------------------

    def checkpoint(self) -> Path:
        from serve_app.engine.checkpoint import cache_dir
        from serve_app.engine.zimage.tiny import ensure_tiny

        if self.args.tiny:
            return ensure_tiny(cache_dir())
        from load_tests.checkpoints import save_full_zimage

        start = time.perf_counter()
        path = save_full_zimage(self.args.checkpoint, device=str(self.device))
        self.result["checkpoint_write_s"] = round(time.perf_counter() - start, 1)
        return path

    def env(self) -> None:
        self.result["env"] = {
            **device_facts(self.device),
            "commit": self.args.commit or git_commit(ROOT),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "matmul_bf16_tflops": round(matmul_tflops(self.device), 1),
        }
        self.log("env", self.result["env"])

    def step_efficiency(self, config, step_s: float, cap_tokens: int, transformer_config):
        """Median step time, its FLOP floor at the measured matmul rate, and MFU (their
        ratio: the share of that rate the step reaches)."""
        rate = self.result["env"]["matmul_bf16_tflops"]
        batch = 2 if config["guidance"] > 0 else 1
        flops = transformer_flops(
            transformer_config, config["width"], config["height"], cap_tokens, batch
        )
        floor_s = flops / (rate * 1e12) if rate else 0.0
        return {
            "step_ms": round(step_s * 1000, 2),
            "step_floor_ms": round(floor_s * 1000, 2),
            "mfu": round(floor_s / step_s, 3) if step_s else 0.0,
        }

    # --- (a) stock diffusers ----------------------------------------------------------

    def stock(self, path: Path) -> None:
        from diffusers import ZImagePipeline

        from serve_app.engine.zimage.encoder import chat_token_ids

        pipe = ZImagePipeline.from_pretrained(path, torch_dtype=self.dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        cap_tokens = len(chat_token_ids(pipe.tokenizer, PROMPT))
        out = {}
        for config in self.configs:
            e2e, encode, decode, denoise, steps, peaks = [], [], [], [], [], []
            before_decode: list[int] = []  # the peak of encoding + denoising
            undo_enc = timed_method(pipe, "encode_prompt", encode, self.device)
            undo_dec = timed_method(
                pipe.vae,
                "decode",
                decode,
                self.device,
                before=lambda into=before_decode: into.append(peak_bytes(self.device)),
            )
            if self.device.type == "cuda":
                # What an earlier, larger size left cached is given back first: each
                # size's card peak is what a stock process drawing that size needs.
                torch.cuda.empty_cache()
            with CardMemory(self.device) as card:
                for run in range(self.args.runs + 1):
                    forwards = ForwardTimes(pipe.transformer, self.device)
                    peak_reset(self.device)
                    with self.timer(e2e):
                        image = stock_image(pipe, config, seed=run)
                    peaks.append(peak_bytes(self.device))
                    steps += forwards.seconds() if run else []
                    denoise.append(forwards.span())
                    forwards.remove()
                    if run == 0:  # warm-up, seed 0
                        for kept in (e2e, encode, decode, denoise, peaks, before_decode):
                            kept.clear()
                        self.images["stock"][config["name"]] = np.asarray(image)
            undo_enc(), undo_dec()
            step_s = statistics.median(steps)
            out[config["name"]] = {
                "e2e": summary(e2e),
                "stages": {
                    "encode": summary(encode),
                    "denoise": summary(denoise),
                    "decode": summary(decode),
                },
                **self.step_efficiency(config, step_s, cap_tokens, pipe.transformer.config),
                "peak_vram_bytes": max(peaks),
                "peak_vram_bytes_before_decode": max(before_decode),
                "card_peak_mib": card.peak_mib,
                "image_size": list(image.size),
            }
            self.log("stock", config["name"], out[config["name"]]["e2e"], "step", step_s)
        self.result["stock"] = out
        self.result["stock_cap_tokens"] = cap_tokens
        del pipe
        self.free()

    # --- (b) our engine ---------------------------------------------------------------

    def load_engine(self, path: Path, **options) -> tuple:
        """Our encoder and denoiser, loaded as the replicas load them (compiled graphs
        kept in this run's compile cache); `options`: Z-Image's, beyond --fuse."""
        from serve_app.engine import load_denoiser, load_encoder

        device = str(self.device)
        encoder = load_encoder(str(path), device)
        denoiser = load_denoiser(
            str(path),
            device,
            "auto",
            self.args.attention,
            self.args.compile,
            {"fuse_projections": self.args.fuse, "cuda_graphs": self.args.graphs, **options},
            compile_cache=self.compile_cache,
        )
        return encoder, denoiser

    @staticmethod
    def keep_latents(denoiser, into: dict, name: str) -> None:
        """Keep the final latents `denoiser` hands its VAE, as `into[name]`."""
        to_vae = denoiser.to_vae

        def kept(latents):
            into[name] = latents.detach().float().cpu()
            return to_vae(latents)

        denoiser.to_vae = kept

    def engine(self, path: Path) -> None:
        from serve_app.engine.compiling import compile_cache_stats
        from serve_app.engine.stages import StageRecorder
        from serve_app.imaging import encode_image

        start = time.perf_counter()
        encoder, denoiser = self.load_engine(path)
        loaded = time.perf_counter() - start
        encoder_warmup = encoder.warmup()
        sizes = sorted({(c["width"], c["height"]) for c in self.configs})
        warmup = denoiser.warmup(sizes)
        self.result["engine_setup"] = {
            "load_s": round(loaded, 1),
            "warmup_s": warmup,
            # From the call to load to ready: what a replica's start costs on this run's
            # compile cache (cold unless --compile-cache named a filled one).
            "ready_s": round(time.perf_counter() - start, 1),
            "compile_cache": {"dir": str(self.compile_cache), **compile_cache_stats()},
            "encoder_warmup_s": encoder_warmup,
            "compile": self.args.compile,
            "attention_backend": self.args.attention,
            "fuse_projections": self.args.fuse,
            "cuda_graphs": len(denoiser.graphs) if denoiser.graphs is not None else None,
            "reserved_after_warmup_bytes": (
                torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
            ),
        }
        self.log("engine setup", self.result["engine_setup"])
        cap_tokens = len(encoder.token_ids(PROMPT))
        if encoder.cuda_graphs:  # the graphed forward must compute the eager one's result
            graphed = encoder.encode(PROMPT, NEGATIVE, True)
            encoder.cuda_graphs = False
            eager = encoder.encode(PROMPT, NEGATIVE, True)
            encoder.cuda_graphs = True
            self.result["engine_setup"]["encoder_graph_rel_err"] = max(
                float((g.float() - e.float()).norm() / e.float().norm())
                for g, e in ((graphed[k], eager[k]) for k in ("prompt", "negative"))
            )
        out = {}
        for config in self.configs:
            params = engine_params(config)
            e2e, png, steps = [], [], []
            stages: dict[str, list[float]] = defaultdict(list)  # every stage recorded
            stage_peaks: dict[str, int] = defaultdict(int)
            self.keep_latents(denoiser, self.latents, config["name"])
            for run in range(self.args.runs + 1):
                # Every stage in the recorder: it resets the device's peak at each stage
                # start, so the call's peak is the largest of the stages' peaks.
                recorder = StageRecorder(self.device)
                with self.timer(e2e):
                    with recorder.stage("encode"):
                        emb = encoder.encode_params(params)
                    pixels = denoiser.generate(params, emb, recorder=recorder)[0]
                self.images["engine"][config["name"]] = pixels
                with self.timer(png):
                    encode_image(pixels, "png", None)
                if run == 0:  # warm-up
                    e2e.clear(), png.clear()
                    continue
                steps += recorder.step_seconds
                for name, rec in recorder.stages.items():
                    stages[name].append(rec.seconds)
                    stage_peaks[name] = max(stage_peaks[name], rec.vram_peak_bytes)
            step_s = statistics.median(steps)
            out[config["name"]] = {
                "e2e": summary(e2e),
                "stages": {k: summary(v) for k, v in stages.items()},
                "png_encode": summary(png),
                **self.step_efficiency(config, step_s, cap_tokens, denoiser.transformer.config),
                "peak_vram_bytes": max(stage_peaks.values()),
                "stage_vram_peak_bytes": stage_peaks,
            }
            self.log("engine", config["name"], out[config["name"]]["e2e"], "step", step_s)
            del denoiser.to_vae  # the class's again
        self.result["engine"] = out
        self.result["engine_cap_tokens"] = cap_tokens
        if denoiser.graphs is not None:
            self.result["engine_graphs"] = self.graphs_check(encoder, denoiser, self.configs[0])
        self.loaded = (encoder, denoiser)  # for the sweep: no second load and compilation

    def graphs_check(self, encoder, denoiser, config: dict) -> dict:
        """The same request with the step's CUDA graphs and without (the compiled calls
        they captured, launched one by one): step times, and the largest pixel
        difference (none expected: the same kernels)."""
        from serve_app.engine.stages import StageRecorder
        from serve_app.messages import GenerationParams

        params = GenerationParams(
            PROMPT, None, config["width"], config["height"], config["steps"], 0.0, 0
        )
        emb = encoder.encode_params(params)
        out, images, graphs = {}, {}, denoiser.graphs
        for name, using in (("graphs", graphs), ("no_graphs", None)):
            denoiser.graphs, steps = using, []
            for run in range(self.args.runs + 1):
                recorder = StageRecorder(self.device)
                images[name] = denoiser.generate(params, emb, recorder=recorder)[0]
                steps += recorder.step_seconds if run else []
            out[f"step_ms_{name}"] = round(statistics.median(steps) * 1000, 2)
        denoiser.graphs = graphs
        diff = np.abs(images["graphs"].astype(int) - images["no_graphs"].astype(int))
        out.update(captured=len(graphs), replays=graphs.replays, max_abs_pixel_diff=int(diff.max()))
        self.log("engine graphs", out)
        return out

    # --- (c) the service over HTTP ----------------------------------------------------

    def service_model(self, path: Path) -> dict:
        """The Z-Image model entry the service and restart phases serve."""
        sizes = sorted({f"{c['width']}x{c['height']}" for c in self.configs})
        return {
            "id": "zimage",
            "model": str(path),
            "compile": self.args.compile,
            "attention_backend": self.args.attention,
            "options": {
                "fuse_projections": self.args.fuse,
                "cuda_graphs": self.args.graphs,
                "precision": self.args.service_precision,
            },
            # The run's cache: empty unless --compile-cache named an earlier run's; the
            # first start fills it and the `restart` phase starts again on it.
            "compile_cache_dir": str(self.compile_cache),
            "warmup_sizes": sizes,
            # The throughput and disconnect sweeps send up to 16 at once: all taken in.
            "requests_per_replica": 64,
        }

    def service(self, path: Path) -> None:
        """Start the app (single-GPU layout) once and run --service-parts against it."""
        from load_tests.local_service import local_service

        model = self.service_model(path)
        # This process's own share of the card (its CUDA context, idle while the service
        # runs): the service's whole-card memory is a reading less this.
        self.result["service_card_baseline_mib"] = CardMemory(self.device).read()
        with (
            tempfile.TemporaryDirectory() as tmp,
            local_service(
                Path(tmp), [model], num_gpus=1, ready_timeout_s=900, env=self.service_env
            ) as svc,
        ):
            self.result["service_setup"] = {
                "precision": self.args.service_precision,
                "env": self.service_env,
                "ready_s": round(svc.ready_s, 1),
                "encoder": svc.handle("PromptEncoder").describe.remote().result(),
                "denoiser": svc.handle("Denoiser").describe.remote().result(),
            }
            self.log("service ready", self.result["service_setup"])
            # The card's readings first: what the other parts draw stays cached.
            for part in sorted(self.args.service_parts, key=lambda part: part != "card"):
                getattr(self, f"service_{part}")(svc)
                self.save()

    def restart(self, path: Path) -> None:
        """The service started again on the compile cache its first start filled: a
        replica's warm restart (target 4 of issue 13), its readiness and what its
        Denoiser loaded and compiled, and its first image of seed 0 against the first
        start's (a cached start must draw the same pixels). Then once more for each
        --restart-env setting, with that environment variable set in the replicas."""
        self.result["service_restart"] = self.start_again(path, self.service_env)
        self.log("service restart", self.result["service_restart"])
        for setting in self.args.restart_env:
            out = self.start_again(path, {**self.service_env, **env_settings([setting])})
            self.result.setdefault("service_restart_env", {})[setting] = out
            self.log("service restart", setting, out)
            self.save()

    @property
    def service_env(self) -> dict[str, str]:
        """--service-env: set in the replicas of the service and restart phases."""
        return env_settings(self.args.service_env)

    def start_again(self, path: Path, env: dict[str, str]) -> dict:
        from load_tests.local_service import local_service

        config = self.configs[0]
        with (
            tempfile.TemporaryDirectory() as tmp,
            local_service(
                Path(tmp), [self.service_model(path)], num_gpus=1, ready_timeout_s=900, env=env
            ) as svc,
            svc.client(timeout=600) as http,
        ):
            denoiser = svc.handle("Denoiser").describe.remote().result()
            images = []
            for _ in range(2):
                r = http.post("/generate", json=self.body(config))
                r.raise_for_status()
                images.append(png_pixels(r.content))
        first = self.images["service"].get(config["name"])
        vs_first = None if first is None else image_difference(images[0], first)
        return {
            "ready_s": round(svc.ready_s, 1),
            "denoiser": {
                k: denoiser.get(k) for k in ("ready_s", "warmup_s", "startup_s", "compile_cache")
            },
            "same_pixels_as_first_start": None if vs_first is None else vs_first["max_abs"] == 0,
            "vs_first_start": vs_first,
            "repeat_vs_first": image_difference(images[1], images[0]),
        }

    @staticmethod
    def body(config: dict, seed: int | None = 0) -> dict:
        body = {
            "prompt": PROMPT,
            "size": f"{config['width']}x{config['height']}",
            "num_inference_steps": config["steps"],
            "guidance_scale": config["guidance"],
        }
        if seed is not None:
            body["seed"] = seed
        if config["guidance"] > 0:
            body["negative_prompt"] = NEGATIVE
        return body

    def service_configs(self, svc) -> None:
        out = {}
        with svc.client(timeout=600) as http:
            for config in self.configs:
                body = self.body(config)
                e2e, timings = [], []
                for run in range(self.args.runs + 1):
                    start = time.perf_counter()
                    r = http.post("/v1/images/generations", json=body)
                    took = time.perf_counter() - start  # the encoded image is here
                    r.raise_for_status()
                    data = r.json()
                    png = base64.b64decode(data["data"][0]["b64_json"])
                    assert png.startswith(b"\x89PNG")
                    if run == 0:  # seed 0, as the other paths' kept images
                        self.images["service"][config["name"]] = png_pixels(png)
                    if run:
                        e2e.append(took)
                        timings.append(data["timings"])
                raw = []  # the same request on POST /generate: PNG bytes, no JSON/base64
                for run in range(self.args.runs + 1):
                    start = time.perf_counter()
                    r = http.post("/generate", json=body)
                    r.raise_for_status()
                    if run:
                        raw.append(time.perf_counter() - start)
                out[config["name"]] = {
                    "e2e": summary(e2e),
                    "e2e_raw_png": summary(raw),
                    # The same seed's last image against its first in this start: is the
                    # served path deterministic from one request to the next?
                    "repeat_vs_first": image_difference(
                        png_pixels(r.content), self.images["service"][config["name"]]
                    ),
                    "stages_ms": {
                        k: round(statistics.median(t[k] for t in timings), 2) for k in timings[0]
                    },
                    "vram": data["vram"],
                }
                self.log("service", config["name"], out[config["name"]]["e2e"])
        self.result["service"] = out

    def service_throughput(self, svc) -> None:
        """Images/s at 1, 4 and 16 clients, and the whole card's memory meanwhile."""
        with CardMemory(self.device) as card:
            self.result["throughput"] = self.throughput(svc.url, self.configs[0])
        self.result["service_card_peak_mib"] = card.peak_mib
        self.log("throughput", self.result["throughput"], "card peak MiB", card.peak_mib)

    def service_card(self, svc) -> None:
        """The whole card (nvidia-smi, every process) while 16 clients are served, for
        each configuration, less this process's own idle share, against stock's card
        peak for the same configuration (issue 13: at or under stock at every size).
        Smallest size first, and before any other part: a replica keeps cached what its
        largest request so far needed (its warm-up gives back its own), so each reading
        is what serving sizes up to that one holds. The service phase runs it first."""
        baseline = self.result["service_card_baseline_mib"]
        out = {}
        for config in sorted(self.configs, key=lambda c: c["width"] * c["height"]):
            with CardMemory(self.device) as card:
                self.throughput(svc.url, config, concurrency=(16,), per_client=1)
            served = card.peak_mib - baseline
            stock = self.result.get("stock", {}).get(config["name"], {}).get("card_peak_mib")
            out[config["name"]] = {
                "served_card_peak_mib": served,
                "stock_card_peak_mib": stock,
                "served_over_stock": round(served / stock, 3) if stock else None,
            }
            self.log("card", config["name"], out[config["name"]])
        self.result["service_card"] = out

    def service_vram_table(self, svc) -> None:
        """Per-stage VRAM peaks at each size: from the JSON answer and, for the same
        request, from the metrics the replicas export (t2i_stage_vram_peak_last_bytes)."""
        configs = sorted(
            (c for c in self.configs if not c["guidance"]), key=lambda c: c["width"] * c["height"]
        )
        rows = []
        with svc.client(timeout=600) as http:
            for config in configs:
                r = http.post("/v1/images/generations", json=self.body(config))
                r.raise_for_status()
                data = r.json()
                exported = self.wait_for_exported_peaks(svc.metrics_url, data["vram"])
                rows.append(
                    {
                        "size": f"{config['width']}x{config['height']}",
                        "answer_bytes": data["vram"],
                        "metrics_bytes": exported,
                        "match": exported == data["vram"],
                        "timings_ms": data["timings"],
                    }
                )
                self.log("vram", rows[-1])
        self.result["vram_table"] = rows

    @staticmethod
    def wait_for_exported_peaks(metrics_url: str, expected: dict, timeout_s: float = 15):
        from prometheus_client.parser import text_string_to_metric_families

        deadline, exported = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            text = httpx.get(metrics_url, timeout=10).text
            exported = {
                sample.labels["stage"]: int(sample.value)
                for family in text_string_to_metric_families(text)
                if family.name == "ray_t2i_stage_vram_peak_last_bytes"
                for sample in family.samples
            }
            if exported == expected:
                break
            time.sleep(0.5)
        return exported

    def service_cancellations(self, svc) -> None:
        """--disconnects clients that leave at random points of a 768x768 request; then
        the denoiser's allocated memory, health, and how fast each loop stopped."""
        rng = random.Random(0)
        config = {"width": 768, "height": 768, "steps": 9, "guidance": 0.0}
        denoiser = svc.handle("Denoiser")
        with svc.client(timeout=600) as http:
            start = time.perf_counter()
            http.post("/v1/images/generations", json=self.body(config)).raise_for_status()
            single = time.perf_counter() - start
        before = denoiser.describe.remote().result()["vram"]["allocated"]
        ids = [f"leaver-{i}" for i in range(self.args.disconnects)]

        def leave(request_id: str) -> None:
            after = rng.uniform(0.02, single * 1.1)
            try:
                with svc.client(timeout=after) as http:
                    http.post(
                        "/v1/images/generations",
                        json=self.body(config, seed=None),
                        headers={"X-Request-Id": request_id},
                    )
            except httpx.TimeoutException:
                pass

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(leave, ids))
        deadline = time.monotonic() + 60
        while denoiser.describe.remote().result()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the last loops stop at their next step boundary
        after = denoiser.describe.remote().result()["vram"]["allocated"]
        records = [denoiser.cancellation.remote(i).result() for i in ids]
        stopped = [r for r in records if r is not None]
        latencies = [r["stop_latency_s"] for r in stopped if r["stop_latency_s"] is not None]
        with svc.client(timeout=600) as http:
            healthy = http.post("/v1/images/generations", json=self.body(config)).status_code
        self.result["cancellations"] = {
            "disconnects": len(ids),
            "size": "768x768",
            "single_request_s": round(single, 3),
            "stopped_by_stage": {
                stage: sum(r["stage"] == stage for r in stopped)
                for stage in sorted({r["stage"] for r in stopped})
            },
            "finished_before_leaving_or_never_reached_denoiser": len(ids) - len(stopped),
            "stop_latency": summary(latencies),
            "max_step_ms": round(
                max((r["max_step_s"] or 0) for r in stopped) * 1000 if stopped else 0, 2
            ),
            "memory_allocated_before": before,
            "memory_allocated_after": after,
            "request_after_status": healthy,
        }
        self.log("cancellations", self.result["cancellations"])

    def throughput(
        self,
        url: str,
        config: dict,
        concurrency: tuple[int, ...] = CONCURRENCY,
        per_client: int | None = None,
    ) -> dict:
        """Closed-loop clients at each `concurrency`, each sending `per_client` requests
        (default: 2 x --runs over the clients, at least 2)."""
        body = self.body(config, seed=None)

        async def client(http, n, latencies):
            for _ in range(n):
                start = time.perf_counter()
                r = await http.post("/v1/images/generations", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)

        async def run(clients: int) -> dict:
            n = per_client or max(2, self.args.runs * 2 // clients)
            latencies: list[float] = []
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
                await client(http, 1, [])  # warm the connection pool
                start = time.perf_counter()
                await asyncio.gather(*(client(http, n, latencies) for _ in range(clients)))
                wall = time.perf_counter() - start
            return {
                "requests": len(latencies),
                "images_per_s": round(len(latencies) / wall, 3),
                "latency": summary(latencies),
            }

        return {str(c): asyncio.run(run(c)) for c in concurrency}

    # --- the sensitivity study: steps x guidance x resolution --------------------------

    def sweep(self, path: Path) -> None:
        """Latency and peak VRAM of our engine over steps (10/25/50), guidance (0/5) and
        resolution (768/1024/1280), one run each after a warm-up per shape. Peak VRAM
        must not grow with steps. Writes a table and, where matplotlib is, a plot."""
        from serve_app.engine.stages import StageRecorder
        from serve_app.messages import GenerationParams

        sides = (768, 1024, 1280) if not self.args.tiny else (192, 256)
        steps_list = (10, 25, 50) if not self.args.tiny else (2, 4)
        encoder, denoiser = self.loaded or self.load_engine(path)  # the engine phase's
        denoiser.warmup([(side, side) for side in sides])
        embeddings = {
            guidance: encoder.encode(PROMPT, NEGATIVE if guidance else None, guidance > 0)
            for guidance in (0.0, 5.0)
        }
        rows = []
        for side in sides:
            for guidance, emb in embeddings.items():
                for steps in steps_list:
                    params = GenerationParams(
                        PROMPT, NEGATIVE if guidance else None, side, side, steps, guidance, 0
                    )
                    took: list[float] = []
                    recorder = StageRecorder(self.device)  # peaks of denoise and decode
                    with self.timer(took):
                        denoiser.generate(params, emb, recorder=recorder)
                    rows.append(
                        {
                            "size": side,
                            "guidance": guidance,
                            "steps": steps,
                            "latency_ms": round(took[0] * 1000, 1),
                            "peak_vram_bytes": max(recorder.vram_peaks().values()),
                        }
                    )
                    self.log("sweep", rows[-1])
        self.result["sweep"] = rows
        self.plot_sweep(rows)
        encoder = denoiser = self.loaded = None
        self.free()

    def plot_sweep(self, rows: list[dict]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("sweep plot skipped: no matplotlib here")
            return
        fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
        for side in sorted({r["size"] for r in rows}):
            for guidance in (0.0, 5.0):
                sel = [r for r in rows if r["size"] == side and r["guidance"] == guidance]
                label = f"{side}², guidance {guidance:g}"
                steps = [r["steps"] for r in sel]
                lat.plot(steps, [r["latency_ms"] / 1000 for r in sel], marker="o", label=label)
                mem.plot(
                    steps, [r["peak_vram_bytes"] / 2**30 for r in sel], marker="o", label=label
                )
        lat.set(xlabel="steps", ylabel="latency (s)", title="latency")
        mem.set(xlabel="steps", ylabel="peak VRAM (GiB)", title="peak VRAM: flat in steps")
        lat.legend(fontsize=7)
        fig.suptitle(f"{self.result['env']['gpu']}, random weights at real size")
        fig.tight_layout()
        fig.savefig(self.stem().with_suffix(".sweep.png"), dpi=110)
        plt.close(fig)

    # --- levers: what each optimisation buys, one at a time -------------------------

    def levers(self, path: Path) -> None:
        """What each optimisation buys, one at a time, at the first configuration's size:
        median times of the prompt encoding, one transformer step, the VAE decode and
        the PNG encoding, with and without each lever; and each variant's relative error
        against a float32 eager reference (measured on an H200: 0.015 for a bf16 step,
        0.02 to 0.04 for the compiled VAE and encoder; *levers-2*, *levers-3*)."""
        config = self.configs[0]
        h, w = config["height"] // 8, config["width"] // 8
        out: dict = {}
        groups = self.args.levers
        if "encoder" in groups:
            real = self.encoder_levers(path, out)
        elif "step" in groups:
            real = self.prompt_embeddings(path)
        if "step" in groups:
            self.step_levers(path, out, real, h, w)
        if {"vae", "image"} & set(groups):  # the image levers encode the VAE's output
            self.vae_levers(path, out, h, w)
        if "image" in groups:
            self.image_levers(out)
        self.result["levers"] = out
        self.log("levers", json.dumps(out, indent=1))

    def compare(self, fn, reference, out: dict, key: str) -> None:
        """Time fn (first call and median) and its relative error against `reference`."""
        start = time.perf_counter()
        got = fn().float()
        out[key + "_first_call_s"] = round(time.perf_counter() - start, 1)
        out[key + "_ms"] = self.median_ms(fn)
        out[key + "_rel_err_vs_fp32"] = float((got - reference).norm() / reference.norm())
        self.log("lever", key, out[key + "_ms"], out[key + "_rel_err_vs_fp32"])

    def prompt_embeddings(self, path: Path) -> torch.Tensor:
        """PROMPT's embeddings, on the device, from the encoder as served."""
        from serve_app.engine import load_encoder

        encoder = load_encoder(str(path), str(self.device))
        real = encoder.encode(PROMPT, None, False)["prompt"].to(self.device)
        encoder = None
        self.free()
        return real

    def encoder_levers(self, path: Path, out: dict) -> torch.Tensor:
        from serve_app.engine.zimage import ZImageEncoder

        def padded(encoder):  # the stock pipeline's way: padded to 512 tokens
            ids = encoder.token_ids(PROMPT)
            mask = (torch.arange(512) < len(ids)).long()[None].to(self.device)
            return encoder._forward(encoder._padded([ids], 512), mask)[0, : len(ids)]

        fp32 = ZImageEncoder.from_pretrained(path, self.device, torch.float32)
        reference = fp32.encode(PROMPT, None, False)["prompt"].float()
        out["prompt_tokens"] = len(fp32.token_ids(PROMPT))
        fp32 = None
        self.free()
        for compiled in (False, True) if self.device.type == "cuda" else (False,):
            encoder = ZImageEncoder.from_pretrained(path, self.device, self.dtype, compile=compiled)
            encoder.warmup()  # as served: on CUDA its graphs are captured here
            kind = "compiled" if compiled else "eager"
            with torch.no_grad():
                self.compare(
                    lambda e=encoder: e.encode(PROMPT, None, False)["prompt"],
                    reference,
                    out,
                    f"encode_real_length_{kind}",
                )
                if not compiled:
                    self.compare(
                        lambda e=encoder: padded(e).cpu(), reference, out, "encode_padded_512_eager"
                    )
            real = encoder.encode(PROMPT, None, False)["prompt"].to(self.device)
            encoder = None
            torch._dynamo.reset()
            self.free()
        return real

    def step_levers(self, path: Path, out: dict, real: torch.Tensor, h: int, w: int) -> None:
        from diffusers.models.transformers import ZImageTransformer2DModel

        from serve_app.engine.compiling import configure_dynamo
        from serve_app.engine.zimage.transformer import prepare_transformer

        latents = torch.randn(1, 16, 1, h, w, device=self.device)
        t = torch.tensor([0.5], device=self.device)

        def load(dtype):
            return ZImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            ).to(self.device)

        def step(model, dtype):
            with torch.no_grad():
                x = list(latents.to(dtype).unbind(0))
                return model(x, t, [real.to(dtype)], return_dict=False)[0][0]

        reference = step(load(torch.float32), torch.float32).float()
        self.free()
        variants = [("stock", False), ("ours", False), ("ours_fused", False)]
        if self.device.type == "cuda":
            variants += [("stock", True), ("ours", True), ("ours_fused", True)]
        for which, compiled in variants:
            model = load(self.dtype)
            if which != "stock":
                prepare_transformer(model, self.args.attention, which == "ours_fused")
            if compiled:
                configure_dynamo()
                model.compile_repeated_blocks(fullgraph=True, dynamic=True)
            key = f"step_{which}_{'compiled' if compiled else 'eager'}"
            self.compare(lambda m=model: step(m, self.dtype), reference, out, key)
            if compiled and which == "ours":
                out["profile_ours_compiled_step"] = self.profile(
                    lambda m=model: step(m, self.dtype)
                )
            model = None
            torch._dynamo.reset()
            self.free()

    def vae_levers(self, path: Path, out: dict, h: int, w: int) -> None:
        from diffusers import AutoencoderKL

        from serve_app.engine.loop import to_pixels

        z = torch.randn(1, 16, h, w, device=self.device)

        def load(dtype):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
            return vae.to(self.device)

        def decode(vae):
            with torch.no_grad():
                return vae.decode(z.to(vae.dtype), return_dict=False)[0]

        reference = decode(load(torch.float32)).float()
        self.free()
        vae = load(self.dtype)
        self.compare(lambda: decode(vae), reference, out, "vae_decode_eager")
        image = decode(vae)
        self.pixels = to_pixels(image).cpu().numpy()
        vae.to(memory_format=torch.channels_last)
        self.compare(lambda: decode(vae), reference, out, "vae_decode_channels_last")
        vae.to(memory_format=torch.contiguous_format)
        if self.device.type == "cuda":
            vae.decoder.compile(dynamic=True)
            self.compare(lambda: decode(vae), reference, out, "vae_decode_compiled")
        vae = None
        torch._dynamo.reset()
        self.free()

    def image_levers(self, out: dict) -> None:
        from serve_app.imaging import encode_image, encode_png

        def pillow_png(img):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        ramp = np.linspace(0, 255, self.pixels.shape[1], dtype=np.uint8)[None, :, None]
        smooth = np.broadcast_to(ramp, self.pixels.shape).copy()
        for name, img in (("random_weights_output", self.pixels), ("smooth_gradient", smooth)):
            for level in (0, 1, 3):
                key = f"png_isal{level}_{name}"
                out[key + "_ms"] = self.median_ms(lambda i=img, lv=level: encode_png(i, lv))
                out[key + "_bytes"] = len(encode_png(img, level))
            key = f"png_pillow_zlib1_{name}"
            out[key + "_ms"] = self.median_ms(lambda i=img: pillow_png(i))
            out[key + "_bytes"] = len(pillow_png(img))
            out[f"jpeg_{name}_q90_ms"] = self.median_ms(lambda i=img: encode_image(i, "jpeg", 90))

    def profile(self, fn, top: int = 12) -> list[dict]:
        """Where one call's device time goes: the top kernels by total CUDA time."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(self.device)
        rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in rows if e.device_time_total) or 1
        return [
            {
                "kernel": e.key[:90],
                "ms": round(e.device_time_total / 1000, 2),
                "share": round(e.device_time_total / total, 3),
                "calls": e.count,
            }
            for e in rows[:top]
        ]

    def median_ms(self, fn, repeats: int = 5) -> float:
        fn()
        times: list[float] = []
        for _ in range(repeats):
            with self.timer(times):
                fn()
        return round(statistics.median(times) * 1000, 2)

    # --- run ----------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def sdxl(self, path: Path | None) -> None:
        from load_tests.bench_families import Families

        Families(self).sdxl()

    def lora(self, path: Path | None) -> None:
        from load_tests.bench_families import Families

        Families(self).lora()

    def reference(self, path: Path) -> None:
        from load_tests.bench_precision import Precision

        Precision(self).reference(path)

    def fp8_eager(self, path: Path) -> None:
        from load_tests.bench_precision import Precision

        Precision(self).fp8_eager(path)

    def fp8(self, path: Path) -> None:
        from load_tests.bench_precision import Precision

        Precision(self).fp8(path)

    def profile_24gb(self, path: Path) -> None:
        from load_tests.bench_precision import Precision

        Precision(self).profile_24gb(path)

    def run(self) -> None:
        self.env()
        path = None  # the Z-Image checkpoint, written when a phase needs it
        for phase in self.args.phases:
            if phase != "sweep" and self.loaded is not None:  # no resident engine but there
                self.loaded = None
                self.free()
            if path is None and phase in ZIMAGE_PHASES:
                path = self.checkpoint()
                self.log("checkpoint", path)
            try:
                getattr(self, phase)(path)
            except Exception as exc:  # noqa: BLE001 - the next phases still run
                if not self.args.keep_going:
                    raise
                self.result.setdefault("failed_phases", {})[phase] = repr(exc)[-2000:]
                self.log("phase", phase, "failed:", repr(exc)[-2000:])
                if phase == "engine" and self.args.graphs:  # the service would fail alike
                    self.args.graphs = False
                    self.log("the next phases run without CUDA graphs")
                self.loaded = None
                self.free()
            self.save()  # what a later phase's crash would lose
        self.result["ratios"] = ratios(self.result)
        stem = self.save()
        self.log("ratios", json.dumps(self.result["ratios"], indent=1))
        self.log("wrote", stem.with_suffix(".json"), stem.with_suffix(".md"))


def env_settings(settings: list[str]) -> dict[str, str]:
    """NAME=VALUE settings as a dict."""
    return dict(setting.partition("=")[::2] for setting in settings)


def engine_params(config: dict):
    """Our engine's request for PROMPT at `config`, seed 0."""
    from serve_app.messages import GenerationParams

    negative = NEGATIVE if config["guidance"] > 0 else None
    return GenerationParams(
        PROMPT, negative, config["width"], config["height"], config["steps"], config["guidance"], 0
    )


def stock_image(pipe, config: dict, seed: int):
    """Stock ZImagePipeline's PIL image of PROMPT at `config` for `seed`, its noise drawn
    on the CPU as our engine draws it."""
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE if config["guidance"] > 0 else None,
        height=config["height"],
        width=config["width"],
        num_inference_steps=config["steps"],
        guidance_scale=config["guidance"],
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images[0]


def ratios(result: dict) -> dict:
    """(b)/(a) and (c)/(a) of end-to-end p50 per configuration, and the overheads."""
    out = {}
    for name, stock in result.get("stock", {}).items():
        row = {}
        a = stock["e2e"]["p50_ms"]
        if name in result.get("engine", {}):
            row["engine_over_stock"] = round(result["engine"][name]["e2e"]["p50_ms"] / a, 3)
        if name in result.get("service", {}):
            c = result["service"][name]["e2e"]["p50_ms"]
            row["service_over_stock"] = round(c / a, 3)
            if name in result.get("engine", {}):
                b = result["engine"][name]["e2e"]["p50_ms"]
                row["http_and_image_encoding_share"] = round((c - b) / c, 3)
        out[name] = row
    return out


def startup_markdown(result: dict) -> list[str]:
    """How long each start took to be ready, and its compile cache's loads and compiles."""
    rows = []
    if engine := result.get("engine_setup"):
        cache = engine["compile_cache"]
        rows.append(("engine, in the bench's process", "", engine["ready_s"],
                     engine["warmup_s"], cache))  # fmt: skip
    starts = [("service", result.get("service_setup")),
              ("service, restarted", result.get("service_restart"))]  # fmt: skip
    for setting, setup in result.get("service_restart_env", {}).items():
        starts.append((f"service, restarted with {setting}", setup))
    starts = [(start, setup) for start, setup in starts if setup]
    for start, setup in starts:
        d = setup["denoiser"]
        rows.append((start, setup["ready_s"], d.get("ready_s"), d.get("warmup_s"),
                     d.get("compile_cache") or {}))  # fmt: skip
    if not rows:
        return []
    lines = [
        "",
        "| start | service ready s | engine / Denoiser ready s | warm-up s | graphs loaded "
        "/ compiled |",
        "|---|---|---|---|---|",
    ]
    for start, service, ready, warmup, cache in rows:
        lines.append(
            f"| {start} | {service} | {ready} | {warmup} | {cache.get('loaded')} / "
            f"{cache.get('compiled')} |"
        )
    for start, setup in starts:
        if parts := setup["denoiser"].get("startup_s"):
            lines += ["", f"Denoiser's start-up ({start}), s: "
                          + ", ".join(f"{k} {v}" for k, v in parts.items()) + "."]  # fmt: skip
    restart = result.get("service_restart", {})
    if restart.get("same_pixels_as_first_start") is not None:
        same, diff = restart["same_pixels_as_first_start"], restart["vs_first_start"]
        lines += ["", f"Restarted service's image of seed 0 equal to the first start's: "
                      f"{same} ({diff})."]  # fmt: skip
    for name, row in result.get("service", {}).items():
        lines.append(f"Seed 0 again in the first start ({name}), against its first image: "
                     f"{row.get('repeat_vs_first')}.")  # fmt: skip
    if repeat := restart.get("repeat_vs_first"):
        lines.append(f"Seed 0 again in the restarted service, against its first: {repeat}.")
    return lines


def markdown(result: dict) -> str:
    env = result.get("env", {})
    lines = [
        f"# GPU benchmark: {env.get('gpu')}",
        "",
        f"- date {env.get('date')}, commit `{env.get('commit')}`",
        f"- torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"transformers {env.get('transformers')}, CUDA {env.get('cuda')}",
        f"- measured dense bf16 matmul: {env.get('matmul_bf16_tflops')} TFLOP/s",
        f"- runs per configuration after one warm-up: {result.get('runs')}",
    ]
    setup = result.get("service_setup", {})
    if (precision := setup.get("precision", "default")) != "default":
        lines.append(f"- the service's transformer (and the restarts'): precision {precision}")
    if env := setup.get("env"):
        lines.append(f"- set in the service's replicas (and the restarts'): {env}")
    if any(result.get(path) for path in ("stock", "engine", "service")):  # Z-Image phases
        lines += [
            "",
            "Step: stock, the device time of one transformer forward (CUDA events); engine, "
            "the wall time of one synchronised step (forward, guidance and Euler update).",
            "",
            "| config | path | e2e p50 ms | e2e p90 ms | step ms | step floor ms | MFU "
            "| peak VRAM GiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for config in result.get("configs", []):
        name = config["name"]
        for path in ("stock", "engine", "service"):
            row = result.get(path, {}).get(name)
            if not row:
                continue
            peak = row.get("peak_vram_bytes")
            lines.append(
                f"| {name} | {path} | {row['e2e'].get('p50_ms')} | {row['e2e'].get('p90_ms')} "
                f"| {row.get('step_ms', '')} | {row.get('step_floor_ms', '')} "
                f"| {row.get('mfu', '')} | {round(peak / 2**30, 2) if peak else ''} |"
            )
    if result.get("ratios"):
        lines += [
            "",
            "| config | (b)/(a) | (c)/(a) | HTTP+image share of (c) |",
            "|---|---|---|---|",
        ]
        for name, r in result["ratios"].items():
            lines.append(
                f"| {name} | {r.get('engine_over_stock', '')} | {r.get('service_over_stock', '')} "
                f"| {r.get('http_and_image_encoding_share', '')} |"
            )
    lines += startup_markdown(result)
    if result.get("throughput"):
        lines += ["", "| concurrent clients | images/s | latency p50 ms |", "|---|---|---|"]
        for c, t in result["throughput"].items():
            lines.append(f"| {c} | {t['images_per_s']} | {t['latency'].get('p50_ms')} |")
    if result.get("service_card"):
        lines += [
            "",
            "The whole card (nvidia-smi, every process) while 16 clients were served, less "
            "this process's idle share, against stock's card peak (MiB):",
            "",
            "| config | served | stock | served / stock |",
            "|---|---|---|---|",
        ]
        for name, c in result["service_card"].items():
            lines.append(
                f"| {name} | {c['served_card_peak_mib']} | {c['stock_card_peak_mib']} "
                f"| {c['served_over_stock']} |"
            )
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    if result.get("vram_table"):
        lines += [
            "",
            "Per-stage VRAM peaks (GiB), served, from the JSON answer = from the exported metric:",
            "",
            "| size | encode | denoise | decode | answer = metric | e2e ms |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["vram_table"]:
            a = row["answer_bytes"]
            lines.append(
                f"| {row['size']} | {gib(a['encode'])} | {gib(a['denoise'])} | {gib(a['decode'])} "
                f"| {row['match']} | {row['timings_ms']['e2e']} |"
            )
    if result.get("cancellations"):
        c = result["cancellations"]
        lines += [
            "",
            f"{c['disconnects']} clients leaving at random points ({c['size']}): stopped by "
            f"stage {c['stopped_by_stage']}; loop stop latency p50 "
            f"{c['stop_latency'].get('p50_ms')} ms, p99 {c['stop_latency'].get('p99_ms')} ms "
            f"(max step {c['max_step_ms']} ms); memory_allocated {c['memory_allocated_before']} -> "
            f"{c['memory_allocated_after']} bytes; next request: HTTP {c['request_after_status']}.",
        ]
    if result.get("sweep"):
        lines += [
            "",
            "| size | guidance | steps | latency ms | peak VRAM GiB |",
            "|---|---|---|---|---|",
        ]
        for r in result["sweep"]:
            lines.append(
                f"| {r['size']} | {r['guidance']} | {r['steps']} | {r['latency_ms']} "
                f"| {gib(r['peak_vram_bytes'])} |"
            )
    from load_tests.bench_families import markdown as families_markdown
    from load_tests.bench_precision import markdown as precision_markdown

    lines += families_markdown(result)
    lines += precision_markdown(result)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "load_tests" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint (smoke run)")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/zimage-full-random"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["stock", "engine", "sweep", "service", "restart", "sdxl", "lora"],
        help="of: levers stock engine service restart sweep (Z-Image), sdxl, lora "
        "(bench_families), "
        "reference fp8_eager fp8 profile_24gb (bench_precision)",
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="compiled graphs of an earlier run (default: a new, empty folder)",
    )
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Z-Image's CUDA graphs (options.cuda_graphs; default off, as served: their pool "
        "held 0.9 GB more of the Denoiser after its warm-up, *perf-1* against *perf-5a*)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="record a failed phase and run the next ones (a GPU run's time is scarce)",
    )
    parser.add_argument("--sdxl-checkpoint", type=Path, default=Path("/tmp/sdxl-full-random"))
    parser.add_argument(
        "--sdxl-parts",
        nargs="+",
        default=["stock", "engine", "service"],
        help="of the sdxl phase: stock engine (with the adapter costs and sweep) service",
    )
    parser.add_argument(
        "--service-parts",
        nargs="+",
        default=["configs", "throughput", "vram_table"],
        help="of: configs throughput card vram_table cancellations",
    )
    parser.add_argument("--disconnects", type=int, default=200)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--attention", default="native")
    parser.add_argument(
        "--lora-mode",
        choices=["fuse", "hotswap"],
        default="fuse",
        help="how the sdxl and lora phases' engines apply adapters (default: as served)",
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="fused q/k/v and w1/w3 projections (default: off, as the service's default)",
    )
    parser.add_argument(
        "--levers",
        nargs="+",
        default=["encoder", "step", "vae", "image"],
        help="lever groups of the levers phase",
    )
    parser.add_argument(
        "--fp8-warmup",
        choices=["replica", "request"],
        default="replica",
        help="the fp8 phase's warm-up: a replica's (every guidance and mask path), or only "
        "each configuration's first, untimed run (its own path: a shorter cold compile)",
    )
    parser.add_argument(
        "--service-precision",
        choices=["default", "fp8"],
        default="default",
        help="the Z-Image transformer's precision in the service and restart phases "
        "(options.precision; default: the model's dtype, as served)",
    )
    parser.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="environment variables set in the replicas of the service and restart phases "
        "(a lever to compare, e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)",
    )
    parser.add_argument(
        "--restart-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="the restart phase starts the service once more for each, with that "
        "environment variable set in its replicas (a start-up lever to compare)",
    )
    parser.add_argument("--commit", default="")
    args = parser.parse_args()
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    Bench(args).run()
    # Results are on disk. A process that started and stopped Ray four times (service,
    # restart, profile_24gb, sdxl) died of SIGSEGV in Ray's core worker at interpreter
    # teardown in 2 smoke runs of 3 on the CPU: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
