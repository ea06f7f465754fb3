"""SDXL and per-request adapters on a GPU: the `sdxl` and `lora` phases of `make bench`.

sdxl: SDXL base at its real size (random weights, load_tests/checkpoints.py) with the
report's preset, 1024x1024, 25 steps, CFG 7, EulerAncestral, bf16, in one run:
  (a) stock StableDiffusionXLPipeline: its own prompt encoding + pipeline call + PIL
      image; without an adapter and with the rank-32 "niannian" adapter at 0.85
      (diffusers' LoRA loader, unfused);
  (b) our engine, loaded as the replicas load it (compiled; adapters applied as
      --lora-mode says, by default merged as served): encode + loop + decode, without
      the adapter and with it;
  (c) the service over HTTP (its preset niannian brings the adapter; "lora": null not);
  the adapter's costs (below) on the engine's denoiser, and the sweep of steps 10/25/50
  for peak VRAM. Whole-card memory (nvidia-smi) is sampled during (a), (b) and (c).
lora: the same adapter costs for Z-Image's transformer at its real size.

Adapter costs, in the engine's --lora-mode: reading a file from local disk onto the
device (a miss), changing to another resident adapter (a hit), a scale change, going
back to no adapter, and the step time at the preset's size with no adapter and with
one; in hotswap mode also with the adapter merged by hand (the merge's time and the
weights' drift after undoing it).
"""

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from load_tests.measure import CardMemory, ForwardTimes, peak_bytes, peak_reset, summary

PROMPT = "ink wash painting of misty mountains and a lone pine, chinese painting style"
NEGATIVE = "blurry, low quality"
SDXL_PRESET = {"width": 1024, "height": 1024, "steps": 25, "guidance": 7.0, "scale": 0.85}
# What the report's adapter adapts: attention and feed-forward of the UNet's transformers.
SDXL_ADAPTED = (
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
)
ZIMAGE_ADAPTED = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"


class Families:
    """The two phases; `bench` is load_tests.bench_gpu.Bench (timer, log, result, args)."""

    def __init__(self, bench):
        self.bench, self.args, self.device = bench, bench.args, bench.device
        self.timer, self.log = bench.timer, bench.log
        preset = SDXL_PRESET
        if self.args.tiny:  # small sizes so the smoke run is quick on a CPU
            preset = {**preset, "width": 256, "height": 256, "steps": 2}
        self.preset = preset
        self.rank = 4 if self.args.tiny else 32
        self.out: dict = bench.result.setdefault("sdxl", {})

    # --- the SDXL phase ---------------------------------------------------------------

    def sdxl(self) -> None:
        path = self.sdxl_checkpoint()
        # The bench's own adapter folder: never the (shared, cached) checkpoint's loras/.
        files = self.sdxl_adapters(path, Path(tempfile.mkdtemp(prefix="t2i-bench-loras-")))
        self.log("sdxl checkpoint", path, [f"{f.name} {f.stat().st_size}" for f in files])
        for part in ("stock", "engine", "service"):
            if part in self.args.sdxl_parts:
                getattr(self, f"sdxl_{part}")(path, files)
                self.bench.save()
        self.out["ratios"] = self.sdxl_ratios()
        self.log("sdxl ratios", self.out["ratios"])

    def sdxl_checkpoint(self) -> Path:
        from serve_app.engine import checkpoint

        if self.args.tiny:
            return checkpoint.resolve("tiny-sdxl")[0]
        from load_tests.checkpoints import save_full_sdxl

        return save_full_sdxl(self.args.sdxl_checkpoint, device=str(self.device))

    def sdxl_adapters(self, path: Path, folder: Path) -> list[Path]:
        """niannian.safetensors (rank 32 on the UNet's attention and feed-forward, about
        the report's 186 MB in bf16) and a second one like it, through diffusers' save,
        in `folder`, for the SDXL checkpoint at `path`."""
        from diffusers import UNet2DConditionModel
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        from serve_app.engine.tiny import random_lora

        folder.mkdir(exist_ok=True)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(path, subfolder="unet")
            )
        files = []
        for seed, name in enumerate(("niannian", "niannian-b")):
            file = folder / f"{name}.safetensors"
            if not file.is_file():
                state, config = random_lora(
                    unet, SDXL_ADAPTED, self.rank, self.rank, seed, 0.01, torch.bfloat16
                )
                StableDiffusionXLLoraLoaderMixin.save_lora_weights(
                    folder,
                    unet_lora_layers=state,
                    weight_name=file.name,
                    unet_lora_adapter_metadata=config,
                )
            files.append(file)
        return files

    def sdxl_stock(self, path: Path, files: list[Path]) -> None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            path, torch_dtype=self.bench.dtype, add_watermarker=False
        ).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        p = self.preset
        out = {}
        for variant in ("base", "niannian"):
            if variant == "niannian":
                pipe.load_lora_weights(str(files[0]), adapter_name="niannian")
                pipe.set_adapters(["niannian"], [p["scale"]])
            e2e, steps, peaks = [], [], []
            with CardMemory(self.device) as card:
                for run in range(self.args.runs + 1):
                    forwards = ForwardTimes(pipe.unet, self.device)
                    peak_reset(self.device)
                    with self.timer(e2e):
                        image = pipe(
                            PROMPT,
                            height=p["height"],
                            width=p["width"],
                            num_inference_steps=p["steps"],
                            guidance_scale=p["guidance"],
                            generator=torch.Generator("cpu").manual_seed(run),
                            output_type="pil",
                        ).images[0]
                    peaks.append(peak_bytes(self.device))
                    steps += forwards.seconds() if run else []
                    forwards.remove()
                    if run == 0:  # warm-up
                        e2e.clear(), peaks.clear()
            out[variant] = {
                "e2e": summary(e2e),
                "step_ms": round(statistics.median(steps) * 1000, 2),
                "peak_vram_bytes": max(peaks),
                "card_peak_mib": card.peak_mib,
                "image_size": list(image.size),
            }
            self.log("sdxl stock", variant, out[variant])
        self.out["stock"] = out
        del pipe
        self.bench.free()

    def sdxl_engine(self, path: Path, files: list[Path]) -> None:
        """Our engine as the replicas load it; then the adapter's costs and the sweep on
        the same denoiser."""
        from serve_app.engine import LoraOptions, load_denoiser, load_encoder
        from serve_app.engine.stages import StageRecorder
        from serve_app.messages import GenerationParams

        p = self.preset
        start = time.perf_counter()
        encoder = load_encoder(str(path), str(self.device))
        denoiser = load_denoiser(
            str(path), str(self.device), "auto", self.args.attention, self.args.compile,
            lora=LoraOptions(slots=1, max_rank=64, mode=self.args.lora_mode),
        )  # fmt: skip
        loaded = time.perf_counter() - start
        warmup = denoiser.warmup([(p["width"], p["height"])])
        self.out["engine_setup"] = {
            "load_s": round(loaded, 1),
            "warmup_s": warmup,
            "compile": self.args.compile,
        }
        self.log("sdxl engine setup", self.out["engine_setup"])
        params = GenerationParams(
            PROMPT, None, p["width"], p["height"], p["steps"], p["guidance"], 0
        )
        adapter = denoiser.read_adapter(files[0])
        variants = (("base", []), ("niannian", [(adapter, p["scale"])]))
        out = {}
        for variant, loras in variants:
            e2e, steps = [], []
            stages: dict[str, list[float]] = defaultdict(list)  # every stage recorded
            stage_peaks: dict[str, int] = defaultdict(int)
            with CardMemory(self.device) as card:
                for run in range(self.args.runs + 1):
                    recorder = StageRecorder(self.device)
                    with self.timer(e2e):
                        with recorder.stage("encode"):
                            embeddings = encoder.encode_params(params)
                        denoiser.generate(params, embeddings, recorder=recorder, loras=loras)
                    if run == 0:  # warm-up
                        e2e.clear()
                        continue
                    steps += recorder.step_seconds
                    for name, rec in recorder.stages.items():
                        stages[name].append(rec.seconds)
                        stage_peaks[name] = max(stage_peaks[name], rec.vram_peak_bytes)
            out[variant] = {
                "e2e": summary(e2e),
                "stages": {k: summary(v) for k, v in stages.items()},
                "step_ms": round(statistics.median(steps) * 1000, 2),
                "peak_vram_bytes": max(stage_peaks.values()),
                "stage_vram_peak_bytes": stage_peaks,
                "card_peak_mib": card.peak_mib,
            }
            self.log("sdxl engine", variant, out[variant])
        self.out["engine"] = out
        if denoiser.graphs is not None:  # after the measurement: its eager runs cache memory
            self.out["graphs"] = self.graphs_check(denoiser, encoder, params, variants)
            self.log("sdxl graphs", self.out["graphs"])
        embeddings = encoder.encode_params(params)
        self.out["lora"] = self.lora_costs(denoiser, params, embeddings, files)
        self.bench.save()
        self.out["sweep"] = self.sweep(denoiser, encoder, params)
        encoder = denoiser = adapter = None
        torch._dynamo.reset()
        self.bench.free()

    def graphs_check(self, denoiser, encoder, params, variants) -> dict:
        """The CUDA graphs draw what the calls they replay draw: each variant's image with
        the graphs and without them (the same seed), and the step time without them."""
        import numpy as np

        from serve_app.engine.stages import StageRecorder

        embeddings = encoder.encode_params(params)
        out = {"captured": len(denoiser.graphs)}
        for variant, loras in variants:
            replays = denoiser.graphs.replays
            graphed = denoiser.generate(params, embeddings, loras=loras)[0]
            if denoiser.graphs.replays == replays:
                raise RuntimeError(f"{variant}: no call was replayed from a graph")
            graphs, denoiser.graphs = denoiser.graphs, None
            recorder = StageRecorder(self.device)
            try:
                eager = denoiser.generate(params, embeddings, loras=loras, recorder=recorder)[0]
            finally:
                denoiser.graphs = graphs
            diff = np.abs(graphed.astype(np.int16) - eager.astype(np.int16))
            out[variant] = {
                "max_abs_pixel_diff": int(diff.max()),
                "mean_abs_pixel_diff": round(float(diff.mean()), 4),
                "eager_step_ms": round(statistics.median(recorder.step_seconds) * 1000, 2),
            }
        return out

    def sweep(self, denoiser, encoder, params) -> list[dict]:
        """Latency and peak VRAM over steps 10/25/50 (with and without guidance): the
        peak must not grow with steps."""
        from dataclasses import replace

        from serve_app.engine.stages import StageRecorder

        rows = []
        for guidance in (0.0, params.guidance_scale):
            for steps in (10, 25, 50) if not self.args.tiny else (2, 4):
                p = replace(params, num_inference_steps=steps, guidance_scale=guidance)
                embeddings = encoder.encode_params(p)
                took: list[float] = []
                recorder = StageRecorder(self.device)
                with self.timer(took):
                    denoiser.generate(p, embeddings, recorder=recorder)
                rows.append(
                    {
                        "size": p.width,
                        "guidance": guidance,
                        "steps": steps,
                        "latency_ms": round(took[0] * 1000, 1),
                        "peak_vram_bytes": max(recorder.vram_peaks().values()),
                    }
                )
                self.log("sdxl sweep", rows[-1])
        return rows

    def sdxl_service(self, path: Path, files: list[Path]) -> None:
        """The service over HTTP, SDXL alone on the card (the config's other model and
        its deployments dropped), its preset niannian (with the adapter) and without."""
        from load_tests.local_service import local_service

        p = self.preset
        model = {
            "id": "sdxl",
            "model": str(path),
            "compile": self.args.compile,
            "attention_backend": self.args.attention,
            "warmup_sizes": [f"{p['width']}x{p['height']}"],
            "lora_dir": str(files[0].parent),
            "lora": {"mode": self.args.lora_mode},
        }
        body = {
            "prompt": PROMPT,
            "model": "sdxl",
            "size": f"{p['width']}x{p['height']}",
            "num_inference_steps": p["steps"],
            "seed": 0,
        }
        out = {}
        with (
            tempfile.TemporaryDirectory() as tmp,
            local_service(Path(tmp), [model], num_gpus=1, ready_timeout_s=900) as svc,
        ):
            den = svc.handle("Denoiser", "sdxl").describe.remote().result()
            out["setup"] = {"ready_s": round(svc.ready_s, 1), "denoiser": den}
            self.log("sdxl service ready", out["setup"])
            with svc.client(timeout=900) as http, CardMemory(self.device) as card:
                for variant, extra in (("base", {"lora": None}), ("niannian", {})):
                    e2e, timings = [], []
                    for run in range(self.args.runs + 1):
                        start = time.perf_counter()
                        r = http.post("/v1/images/generations", json={**body, **extra})
                        took = time.perf_counter() - start
                        r.raise_for_status()
                        data = r.json()
                        if run:
                            e2e.append(took)
                            timings.append(data["timings"])
                    out[variant] = {
                        "e2e": summary(e2e),
                        "stages_ms": {
                            k: round(statistics.median(t[k] for t in timings), 2)
                            for k in timings[0]
                        },
                        "vram": data["vram"],
                        "loras": data["loras"],
                        "guidance_scale": data["guidance_scale"],
                    }
                    self.log("sdxl service", variant, out[variant])
            out["card_peak_mib"] = card.peak_mib
            out["denoiser_after"] = svc.handle("Denoiser", "sdxl").describe.remote().result()
        self.out["service"] = out

    def sdxl_ratios(self) -> dict:
        out = {}
        for variant in ("base", "niannian"):
            a = self.out.get("stock", {}).get(variant, {}).get("e2e", {}).get("p50_ms")
            row = {}
            for path in ("engine", "service"):
                c = self.out.get(path, {}).get(variant, {}).get("e2e", {}).get("p50_ms")
                if a and c:
                    row[f"{path}_over_stock"] = round(c / a, 3)
            out[variant] = row
        return out

    # --- the Z-Image adapter phase ------------------------------------------------------

    def lora(self) -> None:
        """Z-Image's adapter costs at the real size: the transformer (random weights,
        built on the device) taking one adapter in --lora-mode, compiled as served, and a rank-32
        adapter on its main blocks' attention and feed-forward layers."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from diffusers.loaders import ZImageLoraLoaderMixin
        from diffusers.models.transformers import ZImageTransformer2DModel

        from load_tests.checkpoints import FULL, _fill
        from serve_app.engine import LoraOptions
        from serve_app.engine.tiny import random_lora
        from serve_app.engine.zimage import ZImageDenoiser
        from serve_app.engine.zimage import tiny as ztiny
        from serve_app.engine.zimage.transformer import prepare_transformer
        from serve_app.messages import GenerationParams

        dtype = self.bench.dtype
        sizes = FULL if not self.args.tiny else None
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            if sizes is None:
                pipe = ztiny.build_tiny_pipeline()
                transformer, vae = pipe.transformer.to(dtype), pipe.vae.to(dtype)
            else:
                with torch.device("meta"):
                    transformer = ZImageTransformer2DModel(**sizes["transformer"])
                    vae = AutoencoderKL(**sizes["vae"])
                transformer = _fill(transformer.to_empty(device=self.device))
                vae = _fill(vae.to_empty(device=self.device))
        finally:
            torch.set_default_dtype(default)
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for seed, name in enumerate(("style-a", "style-b")):
                state, config = random_lora(
                    transformer, ZIMAGE_ADAPTED, self.rank, self.rank, seed, 0.01, dtype
                )
                ZImageLoraLoaderMixin.save_lora_weights(
                    tmp,
                    transformer_lora_layers=state,
                    weight_name=f"{name}.safetensors",
                    transformer_lora_adapter_metadata=config,
                )
                files.append(Path(tmp) / f"{name}.safetensors")
            prepare_transformer(transformer, self.args.attention)
            slots = ZImageDenoiser.attach(
                transformer, vae, ZImageDenoiser.lora_family.targets, self.args.compile,
                LoraOptions(slots=1, max_rank=64, mode=self.args.lora_mode),
            )  # fmt: skip
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            den = ZImageDenoiser(transformer, vae, dict(scheduler.config), self.device, slots)
            side = 1024 if not self.args.tiny else 256
            steps = 9 if not self.args.tiny else 2
            params = GenerationParams(PROMPT, None, side, side, steps, 0.0, 0)
            hidden = transformer.config.cap_feat_dim
            embeddings = {"prompt": torch.randn(40, hidden, dtype=dtype)}
            for loras in ([], [(den.read_adapter(files[0]), 0.5)]):  # compile both states
                den.generate(params, embeddings, loras=loras)
            self.bench.result["zimage_lora"] = self.lora_costs(den, params, embeddings, files)
        den = transformer = vae = slots = None
        torch._dynamo.reset()
        self.bench.free()

    # --- what an adapter costs ----------------------------------------------------------

    def lora_costs(self, den, params, embeddings, files: list[Path]) -> dict:
        """What an adapter costs on `den`, in the mode it applies adapters in (see
        serve_app/engine/lora): fuse (merged into the weights) or hotswap (slots)."""
        timer, out = self.timer, {}
        from serve_app.engine.lora import FusedLora

        fused = isinstance(den.lora, FusedLora)
        reads: list[float] = []
        for _ in range(3):
            for file in files:
                with timer(reads):
                    den.read_adapter(file)
        adapters = [den.read_adapter(f) for f in files]
        a, b = adapters
        out["adapter"] = {
            "file_bytes": files[0].stat().st_size,
            "device_bytes": a.nbytes,
            "rank": a.rank,
            "modules": len(a.modules),
            "mode": "fuse" if fused else "hotswap",
            "slot_max_rank": den.lora.max_rank,
        }
        if fused:
            out["adapter"]["host_copy_bytes"] = den.lora.host_bytes
        out["miss_read_to_device"] = summary(reads)  # page-cached file: a warm disk read
        switch, scale, back = [], [], []
        den.lora.activate([(a, 0.85)])
        for i in range(6):
            with timer(switch):
                den.lora.activate([(adapters[(i + 1) % 2], 0.85)])
        for s in (0.5, 0.85, 1.0, 0.3, 0.85):
            with timer(scale):
                den.lora.activate([(a, s)])
        for _ in range(3):
            with timer(back):
                den.lora.activate([])
            den.lora.activate([(a, 0.85)])
        out["hit_switch"] = summary(switch)
        out["hit_scale_change"] = summary(scale)
        out["back_to_none"] = summary(back)
        out["step_none"] = self.steps(den, params, embeddings, [])
        out["step_adapter"] = self.steps(den, params, embeddings, [(a, 0.85)])
        none = out["step_none"]["p50_ms"]
        out["adapter_step_over_none"] = round(out["step_adapter"]["p50_ms"] / none, 4)
        if not fused:  # the merge by hand, for comparison
            fuse_s, unfuse_s = [], []
            with timer(fuse_s):
                originals = fuse(den, a, 0.85)
            out["step_fused"] = self.steps(den, params, embeddings, [])
            with timer(unfuse_s):
                drift = unfuse(den, a, 0.85, originals)
            out["fuse_merge_ms"] = round(fuse_s[0] * 1000, 2)
            out["fuse_undo_ms"] = round(unfuse_s[0] * 1000, 2)
            out["fuse_undo_max_abs_drift"] = drift
            out["fused_step_over_none"] = round(out["step_fused"]["p50_ms"] / none, 4)
        self.log("lora costs", out)
        return out

    def steps(self, den, params, embeddings, loras) -> dict:
        """Each synchronised step's time of one request's loop (no decode)."""
        den.lora.activate(loras)
        times: list[float] = []
        with torch.no_grad():
            sampling = den.sampling(params, embeddings)
            for i in range(sampling.num_steps):
                with self.timer(times):
                    sampling.step(i)
        return summary(times[1:] if len(times) > 2 else times)


@torch.no_grad()
def fuse(den, adapter, scale: float) -> dict:
    """Merge `adapter` at `scale` into the base weights of the layers it adapts (what
    diffusers' fuse_lora does), slots off (hotswap mode); returns the weights as they
    were."""
    den.lora.activate([])
    originals = {}
    for module, (a, b, factor) in adapter.modules.items():
        weight = den.lora.layers[module].get_base_layer().weight
        originals[module] = weight.detach().clone()
        weight += ((b.float() @ a.float()) * (factor * scale)).to(weight.dtype)
    return originals


@torch.no_grad()
def unfuse(den, adapter, scale: float, originals: dict) -> float:
    """Subtract the merged delta again; returns the largest difference from the weights
    before the merge (bf16 rounding), then puts the originals back."""
    drift = 0.0
    for module, (a, b, factor) in adapter.modules.items():
        weight = den.lora.layers[module].get_base_layer().weight
        weight -= ((b.float() @ a.float()) * (factor * scale)).to(weight.dtype)
        drift = max(drift, float((weight.float() - originals[module].float()).abs().max()))
        weight.copy_(originals[module])
    return drift


def phase_sdxl(bench) -> None:
    Families(bench).sdxl()


def phase_lora(bench) -> None:
    Families(bench).lora()


def markdown(result: dict) -> list[str]:
    """The sdxl and lora phases' tables, for the benchmark's .md file."""
    gib = lambda b: round(b / 2**30, 2) if b else ""  # noqa: E731
    lines = []
    sdxl = result.get("sdxl", {})
    if sdxl.get("stock") or sdxl.get("engine") or sdxl.get("service"):
        lines += [
            "",
            "SDXL, 1024x1024, 25 steps, CFG 7, EulerAncestral (stock: StableDiffusionXLPipeline "
            "with its own prompt encoding and PIL image; engine: encode + loop + decode; "
            "service: over HTTP, PNG out). Card: nvidia-smi's peak while that path ran.",
            "",
            "| variant | path | e2e p50 ms | e2e p90 ms | step ms | peak VRAM GiB "
            "| card peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in ("base", "niannian"):
            for path in ("stock", "engine", "service"):
                row = sdxl.get(path, {}).get(variant)
                if not row:
                    continue
                card = row.get("card_peak_mib") or sdxl.get(path, {}).get("card_peak_mib", "")
                peak = row.get("peak_vram_bytes") or max(row.get("vram", {}).values(), default=0)
                lines.append(
                    f"| {variant} | {path} | {row['e2e'].get('p50_ms')} "
                    f"| {row['e2e'].get('p90_ms')} | {row.get('step_ms', '')} | {gib(peak)} "
                    f"| {card} |"
                )
        for variant, r in sdxl.get("ratios", {}).items():
            lines.append(f"\n{variant}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
        if graphs := sdxl.get("graphs"):
            lines.append(
                f"\nCUDA graphs: {graphs['captured']} captured; against the same calls "
                "run without them: "
                + "; ".join(
                    f"{v}: pixels differ by at most {r['max_abs_pixel_diff']}, "
                    f"step {r['eager_step_ms']} ms without graphs"
                    for v, r in graphs.items()
                    if isinstance(r, dict)
                )
            )
    for name, costs in (("SDXL", sdxl.get("lora")), ("Z-Image", result.get("zimage_lora"))):
        if not costs:
            continue
        ad = costs["adapter"]
        fused = ad.get("mode") == "fuse"
        how = (
            f"merged into the weights from a host copy of {gib(ad['host_copy_bytes'])} GiB"
            if fused
            else f"hot-swapped into slots of rank {ad['slot_max_rank']}"
        )
        change = "copy the weights back, merge" if fused else "copy into the slot"
        lines += [
            "",
            f"{name} adapter (rank {ad['rank']}, {ad['modules']} layers, {ad['file_bytes']} "
            f"bytes on disk), {how}:",
            "",
            "| what | p50 ms |",
            "|---|---|",
            f"| miss: file read onto the device | {costs['miss_read_to_device'].get('p50_ms')} |",
            f"| hit: another resident adapter ({change}) | {costs['hit_switch'].get('p50_ms')} |",
            f"| hit: scale change | {costs['hit_scale_change'].get('p50_ms')} |",
            f"| back to no adapter | {costs['back_to_none'].get('p50_ms')} |",
            f"| step, no adapter | {costs['step_none'].get('p50_ms')} |",
            f"| step, {'merged' if fused else 'hot-swapped'} adapter "
            f"| {costs['step_adapter'].get('p50_ms')} ({costs['adapter_step_over_none']}x) |",
        ]
        if not fused:
            lines += [
                f"| step, merged by hand | {costs['step_fused'].get('p50_ms')} "
                f"({costs['fused_step_over_none']}x) |",
                f"| merge by hand | {costs['fuse_merge_ms']} |",
                f"| undo the merge | {costs['fuse_undo_ms']} (max drift "
                f"{costs['fuse_undo_max_abs_drift']:.3g}) |",
            ]
    if sdxl.get("sweep"):
        lines += ["", "| SDXL guidance | steps | latency ms | peak VRAM GiB |", "|---|---|---|---|"]
        for r in sdxl["sweep"]:
            peak = gib(r["peak_vram_bytes"])
            lines.append(f"| {r['guidance']} | {r['steps']} | {r['latency_ms']} | {peak} |")
    return lines
