"""Multi-GPU benchmark: images/s of deploy/serve_config.multi_gpu.yaml as the Denoisers
go from one card to every card of the node.

On the machine it runs on, with N GPUs, for each model of the config the bench knows
(zimage at its `turbo` preset, sdxl at `niannian`, both 1024x1024), one model at a time:
the config laid out for N GPUs (deploy/layout.py: the model's PromptEncoder on a share
of card 0, one Denoiser replica per other card; on one GPU the single-GPU layout), its
checkpoint a full-size random-weight one (load_tests/checkpoints.py), started on a local
Ray cluster (load_tests/local_service.py). First with its Denoiser pinned to one
replica (the baseline), then, in place, to all N - 1: closed-loop HTTP clients at
concurrency 1, 4, 16 and 4 x N (the baseline up to 16), each level's images/s, latency
p50/p95 and the answers' stage timings, and every card's memory and utilisation from
nvidia-smi sampled during it. Where each replica landed is checked (the encoder on one
card, each Denoiser on a card of its own). Writes
<out>/<gpu>-x<N>-<date>-multi-gpu.{json,md}: top-level `gpus` and `scaling_efficiency`
(images/s with the N - 1 Denoiser cards / ((N - 1) x images/s with one), each at the
concurrency where it is highest), per model the same and the request rate at which its
encoder would become the bottleneck.

    python -m load_tests.bench_multi_gpu                             # on a multi-GPU machine
    python -m load_tests.bench_multi_gpu --models sdxl --append      # a second call, same file
    python -m load_tests.bench_multi_gpu --tiny --gpus 3 --num-cpus 16 --out /tmp/b  # CPU smoke
    python -m load_tests.bench_multi_gpu --split-guidance --append   # split guidance alone

On a CPU, --gpus declares logical GPUs to Ray and the tiny models run on the CPU
(tests/load_tests/test_bench_multi_gpu.py).

--split-guidance measures instead, engine-level in this process (no Ray), one guided
Z-Image request on one GPU and with classifier-free guidance split over cuda:0 and
cuda:1 (load_tests/bench_split_guidance.py), into the results file's `split_guidance`.
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import yaml

from deploy.layout import SOURCE, adapt, cards, model_ids, most_replicas, pin_denoiser
from load_tests.loadtest import percentiles
from load_tests.local_service import APP, ROOT, deployment_config, local_service
from load_tests.sampling import Periodic
from load_tests.traffic import PATH

# Model id in the config -> the preset measured. The family's checkpoint is written at
# its real size with random weights: speed and memory depend on the architecture only.
PRESETS = {"zimage": "turbo", "sdxl": "niannian"}
# The smoke run's request: the tiny models at the smallest accepted size, two steps.
TINY_REQUEST = {"size": "256x256", "num_inference_steps": 2}
SMI = [
    "nvidia-smi",
    "--query-gpu=index,memory.used,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
]


# --- what nvidia-smi says of each card ----------------------------------------------


def parse_smi(text: str) -> list[dict]:
    """nvidia-smi's CSV rows (SMI's query, no header, no units), one dict a card; a
    field it cannot read ("[N/A]") is None."""

    def number(field: str) -> int | None:
        field = field.strip()
        return None if field.startswith("[") else int(float(field))

    rows = []
    for line in text.strip().splitlines():
        index, used, total, busy = line.split(",")
        rows.append(
            {
                "index": int(index),
                "memory_used_mib": number(used),
                "memory_total_mib": number(total),
                "utilization_pct": number(busy),
            }
        )
    return rows


def card_summary(samples: list[list[dict]]) -> list[dict]:
    """Per card, over `samples` (nvidia-smi readings of every card): the memory used at
    its peak and at the last reading, and the utilisation's mean and peak."""
    by_card: dict[int, list[dict]] = {}
    for reading in samples:
        for row in reading:
            by_card.setdefault(row["index"], []).append(row)
    out = []
    for index, rows in sorted(by_card.items()):
        used = [r["memory_used_mib"] for r in rows if r["memory_used_mib"] is not None]
        busy = [r["utilization_pct"] for r in rows if r["utilization_pct"] is not None]
        out.append(
            {
                "index": index,
                "samples": len(rows),
                "memory_used_peak_mib": max(used, default=None),
                "memory_used_last_mib": used[-1] if used else None,
                "memory_total_mib": rows[-1]["memory_total_mib"],
                "utilization_mean_pct": round(statistics.mean(busy), 1) if busy else None,
                "utilization_max_pct": max(busy, default=None),
            }
        )
    return out


class CardSampler(Periodic):
    """Every card's memory and utilisation from nvidia-smi, read every `every_s` on a
    thread while the block runs. Where there is no nvidia-smi (a CPU run), it reads
    nothing: `available` is False and every summary empty."""

    def __init__(self, every_s: float = 0.5):
        self.available = shutil.which(SMI[0]) is not None
        super().__init__(self.read, every_s if self.available else 0)

    def read(self) -> list[dict]:
        if not self.available:
            return []
        try:
            out = subprocess.run(SMI, capture_output=True, text=True, check=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        return parse_smi(out.stdout)

    def between(self, start: float, end: float) -> list[dict]:
        """card_summary of the readings taken from `start` to `end` (time.monotonic)."""
        return card_summary([rows for t, rows in self.samples if start <= t <= end and rows])


# --- figures from the measurements ------------------------------------------------


def saturated(levels: dict[str, dict]) -> dict:
    """The level (concurrency -> its measurement) where images/s is highest: where the
    Denoisers are saturated, as far as the levels measured reach."""
    concurrency = max(levels, key=lambda c: levels[c]["images_per_s"])
    return {"concurrency": int(concurrency), "images_per_s": levels[concurrency]["images_per_s"]}


def scaling_efficiency(one: float, many: float, denoisers: int) -> float | None:
    """images/s with `denoisers` Denoiser cards / (denoisers x images/s with one card);
    None with one card (nothing scaled)."""
    if denoisers < 2 or one <= 0:
        return None
    return round(many / (denoisers * one), 3)


def encoder_limit(
    encode_ms: float, replicas: int, share: float, rate: float, card_busy_pct: float | None
) -> dict:
    """The request rate at which a model's PromptEncoder deployment becomes the
    bottleneck. Each replica encodes one request at a time on its worker thread, so it
    takes at most 1000 / encode_ms requests/s while its card does nothing else; with only
    its Ray share of the card's time (the other model's encoder busy too), `share` of that.

    Args:
        encode_ms: the answers' median `encode` stage at the measured rate.
        replicas: the deployment's replicas.
        share: each replica's num_gpus (its logical share of card 0).
        rate: the requests/s measured with it (the saturated level's images/s).
        card_busy_pct: nvidia-smi's utilisation of the encoder's card during that level
            (None without nvidia-smi).
    """
    alone = replicas * 1000 / encode_ms if encode_ms > 0 else None
    return {
        "encode_ms_p50": round(encode_ms, 2),
        "replicas": replicas,
        "gpu_share": share,
        "measured_requests_per_s": rate,
        "requests_per_s_card_alone": round(alone, 1) if alone else None,
        "requests_per_s_at_share": round(alone * share, 1) if alone else None,
        "headroom_card_alone": round(alone / rate, 1) if alone and rate else None,
        "headroom_at_share": round(alone * share / rate, 1) if alone and rate else None,
        "card_utilization_pct": card_busy_pct,
        # What the card's utilisation says directly: the rate at which it would be 100%.
        "requests_per_s_at_full_card": (
            round(rate * 100 / card_busy_pct, 1) if card_busy_pct and card_busy_pct >= 1 else None
        ),
    }


def model_figures(phases: dict[str, dict], model: str, encoder: dict) -> dict:
    """A model's figures from its phases: the saturated level with one Denoiser and with
    the most, the scaling efficiency between them, and the encoder's limit at the
    latter's saturated level (its `encode` stage, its card's utilisation).

    Args:
        phases: Denoiser replicas ("1" and, where scaled, the most) -> that phase's
            measurement (MultiGpuBench.measure_phase).
        model: the model id.
        encoder: its PromptEncoder's deployment config, as laid out.
    """
    most = max(phases, key=int)
    one, last = saturated(phases["1"]["levels"]), saturated(phases[most]["levels"])
    level = phases[most]["levels"][str(last["concurrency"])]
    encoder_card = next((c for c in level["cards"] if f"PromptEncoder-{model}" in c["roles"]), {})
    return {
        "saturated": {"1": one, most: last},
        "scaling_efficiency": scaling_efficiency(
            one["images_per_s"], last["images_per_s"], int(most)
        ),
        "encoder_limit": encoder_limit(
            level["timings_ms"].get("encode", 0.0),
            most_replicas(encoder),
            encoder.get("ray_actor_options", {}).get("num_gpus", 0),
            last["images_per_s"],
            encoder_card.get("utilization_mean_pct"),
        ),
    }


def placement_problems(placement: dict[str, list[dict]], gpus: int) -> list[str]:
    """What is wrong with where the replicas landed (empty: nothing): each replica on
    one card; the encoders together on one card; with 2 GPUs or more, each Denoiser
    replica on a card of its own, not the encoders'.

    Args:
        placement: deployment name -> its replicas' describe() (their `gpu_ids`).
        gpus: the GPUs of the node.
    """
    problems = []
    cards_of = {name: [tuple(r["gpu_ids"]) for r in reps] for name, reps in placement.items()}
    for name, ids in cards_of.items():
        problems += [f"{name}: a replica on {list(i)}, not one card" for i in ids if len(i) != 1]
    encoder_cards = {
        i for n, ids in cards_of.items() if n.startswith("PromptEncoder-") for i in ids
    }
    if len(encoder_cards) > 1:
        problems.append(f"the encoders are on several cards: {sorted(encoder_cards)}")
    denoiser_cards = [i for n, ids in cards_of.items() if n.startswith("Denoiser-") for i in ids]
    if gpus > 1:
        if len(set(denoiser_cards)) != len(denoiser_cards):
            problems.append(f"Denoiser replicas share cards: {denoiser_cards}")
        shared = encoder_cards & set(denoiser_cards)
        if shared:
            problems.append(f"a Denoiser is on the encoders' card {sorted(shared)}")
    return problems


# --- the load -----------------------------------------------------------------------


def closed_loop(url: str, body: dict, concurrency: int, per_client: int) -> dict:
    """`concurrency` clients, each sending `body` `per_client` times, one after another
    (the next as soon as its answer is in): images/s over the whole, latency
    percentiles, and the answers' median stage timings (ms). Any answer but 200 fails.

    Args:
        url: the service's base URL.
        body: the JSON body of POST /v1/images/generations.
        concurrency: clients at once.
        per_client: requests each client sends.
    """
    latencies: list[float] = []
    timings: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            r = await http.post(PATH, json=body)
            took = time.perf_counter() - start
            if r.status_code != 200:  # the bench measures answers, never refusals
                raise RuntimeError(f"HTTP {r.status_code} at concurrency {concurrency}: {r.text}")
            latencies.append(took)
            timings.append(r.json()["timings"])

    async def clients() -> float:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
            start = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
            return time.perf_counter() - start

    wall = asyncio.run(clients())
    return {
        "requests": len(latencies),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "latency": percentiles(latencies),
        "timings_ms": {
            k: round(statistics.median(t[k] for t in timings), 2)
            for k in timings[0]
            if all(k in t for t in timings)
        },
    }


# --- the bench ----------------------------------------------------------------------


class MultiGpuBench:
    """One run: every model of --models, one after another, on one local Ray cluster
    each; the result saved after every measurement."""

    def __init__(self, args: argparse.Namespace, source: dict):
        self.args, self.source = args, source
        self.gpus = args.gpus
        self.levels = sorted(set(args.concurrency or (1, 4, 16, 4 * self.gpus)))
        self.baseline_levels = [c for c in self.levels if c <= args.baseline_max_concurrency]
        self.started = time.monotonic()
        self.result: dict = {
            "gpus": self.gpus,
            "denoiser_gpus": max(1, self.gpus - 1),
            "scaling_efficiency": None,
            "scaling_efficiency_model": None,
            "env": self.env(),
            "source": str(args.source.resolve().relative_to(ROOT)),
            "concurrency": self.levels,
            "baseline_concurrency": self.baseline_levels,
            "models": {},
        }
        if args.append and self.stem().with_suffix(".json").exists():
            earlier = json.loads(self.stem().with_suffix(".json").read_text())
            if earlier["gpus"] != self.gpus:
                raise SystemExit(
                    f"{self.stem()}.json is of {earlier['gpus']} GPUs, not {self.gpus}"
                )
            self.result["models"] = earlier["models"]
            if "split_guidance" in earlier:
                self.result["split_guidance"] = earlier["split_guidance"]
        self.cards = CardSampler()
        self.result["env"]["nvidia_smi"] = self.cards.available

    def log(self, *parts) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s]", *parts, flush=True)

    def env(self) -> dict:
        import torch

        from load_tests.measure import device_facts, git_commit

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return {
            **device_facts(device),
            "cuda_devices": torch.cuda.device_count(),
            "commit": self.args.commit or git_commit(ROOT),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def stem(self) -> Path:
        gpu = self.result["env"]["gpu"].replace(" ", "-")
        day = datetime.date.today().isoformat()
        self.args.out.mkdir(parents=True, exist_ok=True)
        return self.args.out / f"{gpu}-x{self.gpus}-{day}-multi-gpu{self.args.tag}"

    def save(self) -> Path:
        stem = self.stem()
        stem.with_suffix(".json").write_text(json.dumps(self.result, indent=2))
        stem.with_suffix(".md").write_text(markdown(self.result))
        return stem

    # --- a model's checkpoint and request ------------------------------------------

    def model_settings(self, model: str, workdir: Path) -> dict:
        """The model's settings changed for the bench: a random full-size checkpoint (or
        the tiny one), its adapter folder, the one size measured warmed up, and room for
        every client of the highest level at one Denoiser replica (the baseline)."""
        from load_tests.checkpoints import save_full_sdxl, save_full_zimage

        settings = {
            "id": model,
            # Both presets draw 1024x1024; the file warms up more sizes, each a compile.
            "warmup_sizes": [self.request(model).get("size", "1024x1024")],
            "requests_per_replica": max(self.levels),
            "lora_dir": None,
        }
        if self.args.tiny:
            path = checkpoint_path({"zimage": "tiny", "sdxl": "tiny-sdxl"}[model])
        elif model == "zimage":
            path = in_child(save_full_zimage, self.args.checkpoint, "cuda")
        else:
            path = in_child(save_full_sdxl, self.args.sdxl_checkpoint, "cuda")
        settings["model"] = str(path)
        if model == "sdxl":
            from load_tests.bench_families import Families

            # niannian.safetensors, which the niannian preset applies at 0.85. Of the
            # GPU bench it serves, Families reads these; sdxl_adapters uses `tiny` alone.
            bench = SimpleNamespace(
                args=SimpleNamespace(tiny=self.args.tiny), device=None, timer=None,
                log=self.log, result={},
            )  # fmt: skip
            Families(bench).sdxl_adapters(path, workdir / "loras")
            settings["lora_dir"] = str(workdir / "loras")
        return settings

    def request(self, model: str) -> dict:
        from load_tests.bench_families import PROMPT as SDXL_PROMPT
        from load_tests.bench_gpu import PROMPT as ZIMAGE_PROMPT

        prompt = {"zimage": ZIMAGE_PROMPT, "sdxl": SDXL_PROMPT}[model]
        body = {"prompt": prompt, "model": model, "preset": PRESETS[model]}
        return {**body, **TINY_REQUEST} if self.args.tiny else body

    # --- one model: baseline, then every card --------------------------------------

    def measure_model(self, model: str) -> None:
        """The model alone, laid out for the node, started with one Denoiser (the
        baseline phase) and scaled in place to all its cards; its figures after."""
        layout = adapt(self.source, self.gpus, [model])
        encoder = deployment_config(layout, f"PromptEncoder-{model}")
        encoders = most_replicas(encoder)
        denoisers = most_replicas(deployment_config(layout, f"Denoiser-{model}"))
        out: dict = {
            "preset": PRESETS[model],
            "request": self.request(model),
            "denoiser_gpus": denoisers,
            "layout": [[f"{n} {s:g}" for n, s in card] for card in cards(layout)],
            "phases": {},
        }
        self.result["models"][model] = out
        with tempfile.TemporaryDirectory(prefix="t2i-multi-gpu-") as tmp:
            workdir = Path(tmp)
            settings = self.model_settings(model, workdir)
            out["checkpoint"] = settings["model"]
            source = workdir / "layout.yaml"
            source.write_text(yaml.safe_dump(pin_denoiser(layout, model, 1)))
            self.log(model, "layout", out["layout"], "starting with one Denoiser")
            with local_service(
                workdir,
                [settings],
                num_gpus=self.gpus,
                num_cpus=self.args.num_cpus,
                ingress_max_replicas=self.args.ingress_max_replicas,
                ready_timeout_s=self.args.ready_timeout,
                source=source,
                args={"api_keys": None},  # the file's keys are a mounted secret
            ) as svc:
                one = self.baseline_levels if denoisers > 1 else self.levels
                out["phases"]["1"] = self.measure_phase(svc, model, encoders, 1, one, svc.ready_s)
                self.save()
                if denoisers > 1:
                    start = time.monotonic()
                    scaled = pin_denoiser(svc.config, model, denoisers)
                    self.redeploy(scaled, model, denoisers, workdir)
                    out["phases"][str(denoisers)] = self.measure_phase(
                        svc, model, encoders, denoisers, self.levels, time.monotonic() - start
                    )
        out.update(model_figures(out["phases"], model, encoder))
        self.log(model, "saturated", out["saturated"], "efficiency", out["scaling_efficiency"])
        self.log(model, "encoder limit", out["encoder_limit"])

    def measure_split_guidance(self) -> dict:
        """Split guidance's phase (load_tests/bench_split_guidance.py) on this machine's
        first two CUDA devices, or skipped with its reason."""
        from load_tests import bench_split_guidance  # torch: not for the serving phases

        if self.args.tiny:
            path = checkpoint_path("tiny")
        elif bench_split_guidance.skip_reason(self.result["env"]["cuda_devices"], False):
            path = None  # skipped: no checkpoint written for nothing
        else:
            from load_tests.checkpoints import save_full_zimage

            path = in_child(save_full_zimage, self.args.checkpoint, "cuda")
        return bench_split_guidance.measure(path, self.args.runs, self.args.tiny, self.log)

    def redeploy(self, config: dict, model: str, replicas: int, workdir: Path) -> None:
        """Apply `config` to the running app in place (Serve keeps the replicas it has:
        a replica count is a light update) and wait for `replicas` Denoisers running."""
        import ray
        from ray import serve

        path = workdir / f"layout-{replicas}.yaml"
        path.write_text(yaml.safe_dump(config))
        # As local_service deploys: the `serve` CLI through this interpreter.
        cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
        address = ray.get_runtime_context().gcs_address
        subprocess.run([*cli, "run", "--address", address, "--non-blocking", str(path)],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        self.log(model, f"scaling the Denoiser to {replicas}")
        deadline = time.monotonic() + self.args.ready_timeout
        while True:
            app = serve.status().applications[APP]
            states = app.deployments[f"Denoiser-{model}"].replica_states
            if app.status == "RUNNING" and states == {"RUNNING": replicas}:
                return
            if app.status == "DEPLOY_FAILED" or time.monotonic() > deadline:
                raise RuntimeError(f"Denoiser-{model} did not reach {replicas}: {app}")
            time.sleep(1)

    def measure_phase(
        self, svc, model: str, encoders: int, replicas: int, levels: list[int], ready_s: float
    ) -> dict:
        """Where the replicas are, a warm-up round, then each level.

        Args:
            svc: the running service (load_tests.local_service.LocalService).
            model: the model id.
            encoders: its PromptEncoder replicas.
            replicas: its Denoiser replicas running.
            levels: the concurrency levels.
            ready_s: how long the service, or the Denoisers' scaling, took to be ready.
        """
        placement = {
            f"PromptEncoder-{model}": described(svc.handle("PromptEncoder", model), encoders),
            f"Denoiser-{model}": described(svc.handle("Denoiser", model), replicas),
        }
        roles: dict[str, list[str]] = {}
        for name, reps in placement.items():
            for r in reps:
                for gpu in r["gpu_ids"]:
                    roles.setdefault(gpu, []).append(name)
        phase = {
            "denoisers": replicas,
            "ready_s": round(ready_s, 1),
            "placement": placement,
            "placement_problems": placement_problems(placement, self.gpus),
            "cards_idle": with_roles(card_summary([self.cards.read()]), roles),
            "levels": {},
        }
        where = {name: [r["gpu_ids"] for r in reps] for name, reps in placement.items()}
        self.log(model, replicas, "placement", where)
        body = self.request(model)
        # Every replica once at least (an adapter's first load, a first call's costs);
        # an adapter's requests go to the replicas holding it until those are full.
        warm = closed_loop(svc.url, body, 4 * replicas, 1)
        phase["warmup"] = {"requests": warm["requests"], "wall_s": warm["wall_s"]}
        for c in levels:
            per_client = max(self.args.requests_per_client, -(-self.args.min_requests // c))
            start = time.monotonic()
            level = closed_loop(svc.url, body, c, per_client)
            level["cards"] = with_roles(self.cards.between(start, time.monotonic()), roles)
            phase["levels"][str(c)] = level
            self.log(model, replicas, f"c={c}", level["images_per_s"], "images/s", level["latency"])
        # With an adapter, how this phase's requests spread over the Denoisers (Serve
        # routes them to the replicas holding it): each one's loads and hits since.
        before = {r["replica"]: adapter_requests(r) for r in placement[f"Denoiser-{model}"]}
        after = described(svc.handle("Denoiser", model), replicas)
        phase["adapter_requests_by_replica"] = {
            r["replica"]: adapter_requests(r) - before.get(r["replica"], 0) for r in after
        }
        return phase

    def run(self) -> None:
        self.log("env", self.result["env"], "levels", self.levels)
        if self.args.split_guidance:
            self.result["split_guidance"] = self.measure_split_guidance()
        else:
            with self.cards:
                for model in self.args.models:
                    self.result["models"].pop(model, None)
                    self.measure_model(model)
                    self.save()
        measured = [m for m in PRESETS if m in self.result["models"]]
        if measured:  # the default model's, Z-Image's where it was measured
            model = measured[0]
            self.result["scaling_efficiency"] = self.result["models"][model]["scaling_efficiency"]
            self.result["scaling_efficiency_model"] = model
        stem = self.save()
        self.log("wrote", stem.with_suffix(".json"), stem.with_suffix(".md"))


def checkpoint_path(model: str) -> Path:
    """The folder of an embedded model ("tiny", "tiny-sdxl"), generated on first use."""
    from serve_app.engine import checkpoint

    return checkpoint.resolve(model)[0]


def in_child(fn, *args):
    """fn(*args) in a child process: a checkpoint built on the GPU leaves no CUDA
    context of this process on card 0, whose memory the bench reports."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


def described(handle, expect: int, timeout_s: float = 120) -> list[dict]:
    """describe() of each of a deployment's `expect` replicas (a call goes to any one:
    asked until each has answered), by replica id."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < expect:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(seen)} of {expect} replicas answered describe()")
        for info in [handle.describe.remote() for _ in range(2 * expect)]:
            d = info.result()
            adapters = d.get("loras") or {}
            seen[d["replica"]] = {
                **{k: d[k] for k in ("replica", "node", "gpu_ids", "device", "ready_s") if k in d},
                **{
                    f"lora_{k}": adapters[k] for k in ("resident", "loads", "hits") if k in adapters
                },
            }
    return [seen[k] for k in sorted(seen)]


def adapter_requests(described_replica: dict) -> int:
    """Requests a Denoiser replica has served with an adapter (its loads and hits)."""
    counts = (described_replica.get(f"lora_{k}", {}) for k in ("loads", "hits"))
    return sum(sum(c.values()) for c in counts)


def with_roles(summary: list[dict], roles: dict[str, list[str]]) -> list[dict]:
    """Each card's summary with the deployments on it (Ray's GPU ids are the cards'
    indices where CUDA_VISIBLE_DEVICES is not set)."""
    return [{**card, "roles": roles.get(str(card["index"]), [])} for card in summary]


# --- the report ---------------------------------------------------------------------


def markdown(result: dict) -> str:
    """The results file's report: the run's facts, then each model's section."""
    env = result["env"]
    lines = [
        f"# Multi-GPU benchmark: {env.get('gpu')} x{result['gpus']}",
        "",
        f"- date {env.get('date')}, commit `{env.get('commit')}`",
        f"- torch {env.get('torch')}, diffusers {env.get('diffusers')}, CUDA {env.get('cuda')}",
        f"- config {result['source']}, laid out for {result['gpus']} GPUs by deploy/layout.py",
        f"- scaling efficiency ({result.get('scaling_efficiency_model')}): "
        f"{result.get('scaling_efficiency')}",
    ]
    for model, m in result["models"].items():
        lines += model_markdown(model, m)
    if "split_guidance" in result:
        from load_tests.bench_split_guidance import markdown as split_markdown

        lines += split_markdown(result["split_guidance"])
    return "\n".join(lines) + "\n"


def model_markdown(model: str, m: dict) -> list[str]:
    """One model's section: every level of every phase, then (once it has them) the
    saturated figures, each phase's placement and cards, and the encoder's limit."""
    request = ", ".join(f"{k} {v}" for k, v in m["request"].items() if k != "prompt")
    lines = ["", f"## {model}: {request}", ""]
    lines += [f"- card {i}: {', '.join(card)}" for i, card in enumerate(m["layout"])]
    lines += [
        "",
        "| Denoisers | concurrency | requests | images/s | p50 ms | p95 ms | encode ms "
        "| denoise ms | utilisation % (mean), card:% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in m["phases"].values():
        for c, level in phase["levels"].items():
            busy = " ".join(
                f"{card['index']}:{card['utilization_mean_pct']}"
                for card in level["cards"]
                if card["roles"]
            )
            t = level["timings_ms"]
            lines.append(
                f"| {phase['denoisers']} | {c} | {level['requests']} | {level['images_per_s']} "
                f"| {level['latency']['p50_ms']} | {level['latency']['p95_ms']} "
                f"| {t.get('encode')} | {t.get('denoise')} | {busy or 'n/a'} |"
            )
    if "saturated" not in m:
        return lines  # a run that stopped within this model
    one, most = m["saturated"]["1"], m["saturated"][str(m["denoiser_gpus"])]
    lines += [
        "",
        f"Saturated: one Denoiser {one['images_per_s']} images/s (at concurrency "
        f"{one['concurrency']}), {m['denoiser_gpus']} Denoisers {most['images_per_s']} (at "
        f"{most['concurrency']}): scaling efficiency {m['scaling_efficiency']}.",
    ]
    for phase in m["phases"].values():
        spread = list(phase.get("adapter_requests_by_replica", {}).values())
        lines += [
            "",
            f"{phase['denoisers']} Denoiser(s): ready {phase['ready_s']} s; placement "
            f"{phase['placement_problems'] or 'as intended'}"
            + (f"; requests with the adapter, by replica: {spread}." if any(spread) else "."),
            "",
            *cards_markdown(phase),
        ]
    e = m["encoder_limit"]
    busy = (
        f"its card {e['card_utilization_pct']}% busy meanwhile (100% at "
        f"{e['requests_per_s_at_full_card']} requests/s)"
        if e["card_utilization_pct"] is not None
        else "no nvidia-smi here for its card's utilisation"
    )
    return lines + [
        "",
        f"Encoder: {e['encode_ms_p50']} ms an encode at {e['measured_requests_per_s']} "
        f"requests/s ({e['replicas']} replica(s), {e['gpu_share']} of card 0 each): the "
        f"bottleneck from {e['requests_per_s_card_alone']} requests/s with the card to "
        f"itself ({e['headroom_card_alone']}x this node's rate), from "
        f"{e['requests_per_s_at_share']} requests/s with only its share of the card "
        f"({e['headroom_at_share']}x); {busy}.",
    ]


def cards_markdown(phase: dict) -> list[str]:
    """A phase's cards: what is on each, its memory idle and at its peak over the
    levels, and its utilisation at the highest level."""
    if not phase["cards_idle"]:
        return ["No nvidia-smi here: no card readings."]
    lines = [
        "| card | on it | memory idle MiB | memory peak MiB (load) | utilisation mean % "
        "(highest level) |",
        "|---|---|---|---|---|",
    ]
    idle = {c["index"]: c for c in phase["cards_idle"]}
    for card in phase["levels"][max(phase["levels"], key=int)]["cards"]:
        peak = max(
            (
                c["memory_used_peak_mib"] or 0
                for level in phase["levels"].values()
                for c in level["cards"]
                if c["index"] == card["index"]
            ),
            default=None,
        )
        lines.append(
            f"| {card['index']} | {', '.join(card['roles']) or '-'} "
            f"| {idle.get(card['index'], {}).get('memory_used_last_mib')} | {peak} "
            f"| {card['utilization_mean_pct']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SOURCE, help="the Serve config laid out")
    parser.add_argument(
        "--gpus", type=int, help="GPUs to use (default: every CUDA device; on a CPU: required)"
    )
    parser.add_argument(
        "--models", nargs="+", help=f"model ids of --source to measure, of {list(PRESETS)} "
        "(default: those of them the config serves)"
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the tiny models, 256x256, 2 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "load_tests" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--append", action="store_true", help="keep the other models of today's results file"
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/zimage-full-random"))
    parser.add_argument("--sdxl-checkpoint", type=Path, default=Path("/tmp/sdxl-full-random"))
    parser.add_argument(
        "--concurrency", nargs="+", type=int, help="levels (default: 1 4 16 and 4 x GPUs)"
    )
    parser.add_argument(
        "--baseline-max-concurrency", type=int, default=16,
        help="the one-Denoiser baseline's highest level (one card saturates long before)",
    )  # fmt: skip
    parser.add_argument("--min-requests", type=int, default=16, help="requests a level at least")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, help="CPUs Ray declares (default: the host's)")
    parser.add_argument("--ingress-max-replicas", type=int, help="cap the Ingress's autoscaling")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--commit", default="")
    parser.add_argument(
        "--split-guidance", action="store_true",
        help="measure split guidance instead (load_tests/bench_split_guidance.py; no Ray)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="--split-guidance's runs an engine")
    args = parser.parse_args(argv)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
        if not args.gpus:
            parser.error("no CUDA device here: --gpus N declares N logical GPUs (with --tiny)")
    source = yaml.safe_load(args.source.read_text())
    served = model_ids(source)
    args.models = args.models or [m for m in PRESETS if m in served]
    unknown = [m for m in args.models if m not in PRESETS or m not in served]
    if unknown:
        parser.error(f"models {unknown}: the bench measures {list(PRESETS)} where {args.source} "
                     f"serves them; it serves {served}")  # fmt: skip
    MultiGpuBench(args, source).run()


if __name__ == "__main__":
    main()
