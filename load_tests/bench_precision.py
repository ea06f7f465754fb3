"""Numbers behind the served image and float8, for `make bench` (load_tests/bench_gpu.py):
the `reference`, `fp8_eager`, `fp8` and `profile_24gb` phases, and the equivalence of
every path's image with stock diffusers'.

reference: stock ZImagePipeline in float32 (TF32 off), seed 0, at the first
  configuration: the image every bf16 path is measured against.
fp8_eager: one transformer step at full size, eager, with the main blocks' linear
  layers in float8 (torchao) against the same step in bf16: time and relative error.
  Cheap (no compilation): it shows the float8 path runs on this host before `fp8`.
fp8: our engine with `precision: fp8`, loaded and warmed as a replica would be
  (compiled, CUDA graphs), at the run's 1024x1024 configurations: e2e, step, its
  compile time, and its deviation from the bf16 engine's output for the same seed
  (relative L2 of the final latents; PSNR of the decoded image).
profile_24gb: deploy/serve_config.24gb.yaml served as it is, its model pointed at the
  run's checkpoint, with its memory caps in bytes: 16 concurrent clients at 1024x1024,
  the whole card's memory meanwhile (nvidia-smi) against 24 GiB, every answer's status.

Equivalence (target 5 of issue 13): each path's image against stock diffusers' bf16
image and against the float32 reference, as mean and max absolute pixel difference and
PSNR. The tolerance a path must keep: its PSNR against the float32 reference at least
stock bf16's own, less TOLERANCE_DB. Float8 is reported apart (it is not bf16).
"""

import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from load_tests.measure import CardMemory, image_difference, png_pixels, summary

# A served path keeps the tolerance when its image is within this many dB of stock bf16's
# own PSNR against the float32 reference: as close to float32 as stock's bf16 is.
TOLERANCE_DB = 1.0
CARD_24GB = 24 * 2**30
SPARE_24GB = 3 * 2**30
ROOT = Path(__file__).resolve().parents[1]
PROFILE_24GB = ROOT / "deploy" / "serve_config.24gb.yaml"


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).norm() / reference.norm())


def equivalence(images: dict, latents: dict, result: dict) -> dict:
    """Each path's seed-0 image against stock bf16's for the same configuration, and at
    the reference's configuration against the float32 reference, with the tolerance
    verdict; float8 apart."""
    out: dict = {}
    stock = images.get("stock", {})
    reference = images.get("reference", {})
    for path in ("engine", "service", "fp8", "profile_24gb"):
        for name, image in images.get(path, {}).items():
            row = {}
            if name in stock:
                row["vs_stock_bf16"] = image_difference(image, stock[name])
            if name in reference:
                row["vs_float32"] = image_difference(image, reference[name])
            if path in ("engine", "service") and name in reference and name in stock:
                own = image_difference(stock[name], reference[name])["psnr_db"]
                ours = row["vs_float32"]["psnr_db"]
                row["stock_bf16_vs_float32_psnr_db"] = own
                # Equal images (None) are within any tolerance.
                row["within_tolerance"] = None in (own, ours) or ours >= own - TOLERANCE_DB
            if path == "fp8" and name in latents and f"fp8:{name}" in latents:  # the engine's
                row["latents_rel_l2_vs_bf16_engine"] = relative_l2(
                    latents[f"fp8:{name}"], latents[name]
                )
            # The bf16 engine's image, or where the run had no engine phase, the eager
            # bf16 engine's that the fp8 phase drew for the purpose.
            bf16 = images.get("engine", {}).get(name)
            bf16 = images.get("bf16_eager", {}).get(name) if bf16 is None else bf16
            if path in ("fp8", "profile_24gb") and bf16 is not None:
                row["vs_bf16_engine"] = image_difference(image, bf16)
            out.setdefault(path, {})[name] = row
    return out


class Precision:
    """The phases; `bench` is load_tests.bench_gpu.Bench (timer, log, result, args)."""

    def __init__(self, bench):
        self.bench, self.args, self.device = bench, bench.args, bench.device
        self.timer, self.log, self.result = bench.timer, bench.log, bench.result
        # The fp8 paths run at the run's 1024x1024 configurations (turbo, guidance 5).
        self.configs = [c for c in bench.configs if c["width"] == bench.configs[0]["width"]]

    def reference(self, path: Path) -> None:
        from diffusers import ZImagePipeline

        from load_tests.bench_gpu import stock_image

        config = self.bench.configs[0]
        # Set and restored through fp32_precision: restoring `allow_tf32` would leave
        # "ieee" where torch's default is "none", and inductor keys its compile cache on
        # it, so every graph compiled after this phase would miss what a replica wrote.
        backends = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        tf32 = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            start = time.perf_counter()
            pipe = ZImagePipeline.from_pretrained(path, torch_dtype=torch.float32)
            pipe.to(self.device).set_progress_bar_config(disable=True)
            image = stock_image(pipe, config, seed=0)
        finally:
            for b, precision in zip(backends, tf32, strict=True):
                b.fp32_precision = precision
        self.bench.images["reference"][config["name"]] = np.asarray(image)
        self.result["reference"] = {
            "config": config["name"],
            "dtype": "float32",
            "seed": 0,
            "took_s": round(time.perf_counter() - start, 1),
        }
        self.log("reference", self.result["reference"])
        del pipe
        self.bench.free()

    def fp8_eager(self, path: Path) -> None:
        """One eager transformer step, bf16 against float8, at the first configuration."""
        from diffusers.models.transformers import ZImageTransformer2DModel

        from serve_app.engine.precision import quantize_fp8
        from serve_app.engine.zimage.denoiser import FP8_TARGETS
        from serve_app.engine.zimage.transformer import prepare_transformer

        config = self.bench.configs[0]
        h, w = config["height"] // 8, config["width"] // 8
        model = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=torch.bfloat16
        ).to(self.device)
        prepare_transformer(model)
        generator = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn(1, 16, 1, h, w, generator=generator).to(self.device)
        caption = torch.randn(96, model.config.cap_feat_dim, generator=generator)
        caption = caption.to(self.device, torch.bfloat16)
        t = torch.tensor([0.5], device=self.device)

        def step():
            with torch.no_grad():
                return model([latents.to(torch.bfloat16)[0]], t, [caption], return_dict=False)[0][0]

        out = {"bf16_step_ms": self.bench.median_ms(step)}
        bf16 = step().float()
        out["fp8_layers"] = quantize_fp8(model, FP8_TARGETS, self.device)
        out["fp8_step_ms"] = self.bench.median_ms(step)
        out["fp8_rel_l2_vs_bf16"] = relative_l2(step().float(), bf16)
        out["weights_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        self.result["fp8_eager"] = out
        self.log("fp8 eager", out)
        model = None
        self.bench.free()

    def fp8(self, path: Path) -> None:
        """Our engine with precision fp8, as a replica runs it, at 1024x1024."""
        from load_tests.bench_gpu import engine_params
        from serve_app.engine.compiling import compile_cache_stats
        from serve_app.engine.stages import StageRecorder

        if any(c["name"] not in self.bench.latents for c in self.configs):
            self.bf16_eager(path)
        torch._dynamo.reset()  # the bf16 engine's compiled code, gone with it
        before = compile_cache_stats()
        start = time.perf_counter()
        # The CPU smoke run has no float8: it runs this phase's code in the default one.
        precision = "default" if self.args.tiny else "fp8"
        encoder, denoiser = self.bench.load_engine(path, precision=precision)
        loaded = time.perf_counter() - start
        encoder.warmup()
        if self.args.fp8_warmup == "replica":
            sizes = sorted({(c["width"], c["height"]) for c in self.configs})
            warmup = denoiser.warmup(sizes)
        else:  # "request": each configuration's first, untimed run compiles its path only
            warmup = None
        after = compile_cache_stats()
        out: dict = {
            "setup": {
                "compile": self.args.compile,
                "cuda_graphs": self.args.graphs,
                "warmup": self.args.fp8_warmup,
                "load_s": round(loaded, 1),
                "warmup_s": warmup,
                "ready_s": round(time.perf_counter() - start, 1),
                "compile_cache": {k: after[k] - before[k] for k in after},
                "denoiser_allocated_bytes": (
                    torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
                ),
            }
        }
        self.log("fp8 setup", out["setup"])
        for config in self.configs:
            name = config["name"]
            params = engine_params(config)
            self.bench.keep_latents(denoiser, self.bench.latents, f"fp8:{name}")
            e2e, steps = [], []
            for run in range(self.args.runs + 1):
                recorder = StageRecorder(self.device)
                with self.timer(e2e):
                    emb = encoder.encode_params(params)
                    pixels = denoiser.generate(params, emb, recorder=recorder)[0]
                if run:
                    steps += recorder.step_seconds
                else:
                    first_s = e2e.pop()
            del denoiser.to_vae
            self.bench.images["fp8"][name] = pixels
            out[name] = {
                "e2e": summary(e2e),
                "step_ms": round(statistics.median(steps) * 1e3, 2),
                "first_run_s": round(first_s, 1),  # with --fp8-warmup request, its compile
            }
            self.log("fp8", name, out[name])
        self.result["fp8"] = out
        encoder = denoiser = None
        self.bench.free()

    def bf16_eager(self, path: Path) -> None:
        """The bf16 output float8 is measured against, where the run has no engine phase:
        our engine in bf16, eager (no compilation to wait for), seed 0 at each of the
        fp8 phase's configurations; its final latents and image."""
        from load_tests.bench_gpu import engine_params
        from serve_app.engine import load_denoiser, load_encoder

        start = time.perf_counter()
        device = str(self.device)
        encoder = load_encoder(str(path), device)
        denoiser = load_denoiser(str(path), device, "auto", compile=False)
        for config in self.configs:
            params = engine_params(config)
            self.bench.keep_latents(denoiser, self.bench.latents, config["name"])
            pixels = denoiser.generate(params, encoder.encode_params(params))[0]
            del denoiser.to_vae
            self.bench.images["bf16_eager"][config["name"]] = pixels
        self.result["fp8_bf16_reference"] = {
            "path": "engine, bf16, eager",
            "took_s": round(time.perf_counter() - start, 1),
        }
        self.log("fp8's bf16 reference", self.result["fp8_bf16_reference"])
        encoder = denoiser = None
        self.bench.free()

    def profile_24gb(self, path: Path) -> None:
        """deploy/serve_config.24gb.yaml as shipped (its caps in bytes), on this card. The
        card's memory is read with this process idle on it first (its CUDA context):
        the profile's own is the peak less that."""
        from load_tests.local_service import local_service

        config = self.configs[0]
        body = self.bench.body(config)
        model = {
            "id": "zimage",
            "model": str(path),
            "compile_cache_dir": str(self.bench.compile_cache),
            # All 16 clients taken in (the file takes 4 and refuses the rest): the
            # Denoiser runs one at a time either way, the others wait in the replica.
            "requests_per_replica": 16,
        }
        out: dict = {"config": str(PROFILE_24GB.relative_to(ROOT))}
        out["baseline_mib"] = baseline = CardMemory(self.device).read()
        with (
            tempfile.TemporaryDirectory() as tmp,
            local_service(
                Path(tmp),
                [model],
                num_gpus=1,
                ready_timeout_s=900,
                deployments={"Denoiser-zimage": {"max_ongoing_requests": 16}},
                source=PROFILE_24GB,
            ) as svc,
            CardMemory(self.device) as card,
        ):
            out["ready_s"] = round(svc.ready_s, 1)
            out["ready_card_mib"] = card.read() - baseline
            out["encoder"] = svc.handle("PromptEncoder").describe.remote().result()
            out["denoiser"] = svc.handle("Denoiser").describe.remote().result()
            self.log("24gb ready", out["ready_s"], "card MiB", card.last_mib)
            e2e = []
            with svc.client(timeout=900) as http:
                for run in range(self.args.runs + 1):
                    start = time.perf_counter()
                    r = http.post("/generate", json=body)
                    took = time.perf_counter() - start
                    r.raise_for_status()
                    if run == 0:
                        self.bench.images["profile_24gb"][config["name"]] = png_pixels(r.content)
                    else:
                        e2e.append(took)
            out["single_client"] = summary(e2e)
            clients, each = 16, max(2, self.args.runs // 2)

            def client(_):
                statuses, times = [], []
                with httpx.Client(base_url=svc.url, timeout=900) as http:
                    for _ in range(each):
                        start = time.perf_counter()
                        r = http.post("/generate", json={**body, "seed": None})
                        times.append(time.perf_counter() - start)
                        statuses.append(r.status_code)
                return statuses, times

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(client, range(clients)))
            wall = time.perf_counter() - start
            statuses = [s for d in done for s in d[0]]
            out["concurrent"] = {
                "clients": clients,
                "requests": len(statuses),
                "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                "images_per_s": round(statuses.count(200) / wall, 3),
                "latency": summary([t for d in done for t in d[1]]),
            }
            out["denoiser_after"] = svc.handle("Denoiser").describe.remote().result()
        out["card_peak_mib"] = peak = card.peak_mib - baseline
        out["headroom_of_24gib_mib"] = (CARD_24GB >> 20) - peak
        out["meets_3gib_spare"] = bool(card.peak_mib) and peak <= (CARD_24GB - SPARE_24GB) >> 20
        self.result["profile_24gb"] = out
        self.log("24gb", {k: v for k, v in out.items() if k not in ("encoder", "denoiser")})


def markdown(result: dict) -> list[str]:
    """The precision phases' and the equivalence tables, for the benchmark's .md file."""
    lines = []
    if eq := result.get("equivalence"):
        lines += [
            "",
            "Images of seed 0 against stock diffusers' bf16 image and against stock's float32 "
            f"image (the reference; TF32 off): mean / max absolute difference in levels, "
            f"PSNR dB. Tolerance: PSNR vs float32 at least stock bf16's own less "
            f"{TOLERANCE_DB} dB.",
            "",
            "| path | config | vs stock bf16 | vs float32 | stock bf16 vs float32 dB | within |",
            "|---|---|---|---|---|---|",
        ]
        fmt = lambda d: f"{d['mean_abs']} / {d['max_abs']} / {d['psnr_db']}" if d else ""  # noqa: E731
        for path, rows in eq.items():
            for name, row in rows.items():
                lines.append(
                    f"| {path} | {name} | {fmt(row.get('vs_stock_bf16'))} "
                    f"| {fmt(row.get('vs_float32'))} "
                    f"| {row.get('stock_bf16_vs_float32_psnr_db', '')} "
                    f"| {row.get('within_tolerance', '')} |"
                )
                if "latents_rel_l2_vs_bf16_engine" in row:
                    lines.append(
                        f"|  | (vs the bf16 engine: latents rel. L2 "
                        f"{row['latents_rel_l2_vs_bf16_engine']:.4f}, image "
                        f"{fmt(row.get('vs_bf16_engine'))}) | | | | |"
                    )
    if fp8 := result.get("fp8"):
        lines += ["", f"fp8 engine setup: {fp8['setup']}", ""]
        lines += ["| fp8 config | e2e p50 ms | step ms |", "|---|---|---|"]
        for name, row in fp8.items():
            if name != "setup":
                lines.append(f"| {name} | {row['e2e'].get('p50_ms')} | {row['step_ms']} |")
    if eager := result.get("fp8_eager"):
        lines += ["", f"fp8, one eager step: {eager}"]
    if p := result.get("profile_24gb"):
        lines += [
            "",
            f"24 GB profile ({p['config']}): ready {p['ready_s']} s; one client p50 "
            f"{p['single_client'].get('p50_ms')} ms; {p['concurrent']['clients']} clients: "
            f"{p['concurrent']['statuses']}, {p['concurrent']['images_per_s']} images/s; "
            f"card peak {p['card_peak_mib']} MiB, {p['headroom_of_24gib_mib']} MiB of 24 GiB "
            f"left (3 GiB spare: {p['meets_3gib_spare']}).",
        ]
    return lines
