"""One real Ray Serve application for the whole test session.

Ray starts with logical GPUs (the engine runs on the CPU); the app is deployed from
deploy/serve_config.yaml with the `serve run` CLI, as a user would, with test-only
changes: free ports, test checkpoints and adapter folders, one Ingress replica (two
cores in CI), two Denoiser replicas for SDXL (adapter routing).
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from load_tests.local_service import CONFIG, derived_app, local_service
from serve_app.engine.checkpoint import cache_dir, resolve
from serve_app.engine.zimage.tiny import ensure_tiny
from serve_app.ingress.keys import new_entry

# The three apps ask for 2.375 GPUs in fractions (five Denoisers at 3/8, four encoders at
# 1/8); a replica must fit on one card, and on two cards an unlucky placement order
# leaves a Denoiser nowhere to go (a CI run: three encoders and a Denoiser on one card).
# On three, any order fits.
NUM_GPUS = 3
# On the CPU a 1024x1024 step of the tiny transformer takes ~0.2 s and decoding one
# 1024x1024 image ~1.5 s: long enough to cancel in the act.
SLOW = {"prompt": "a slow one", "size": "1024x1024", "num_inference_steps": 60}
SDXL_REPLICAS = 2
MAIN_REQUESTS_PER_REPLICA = 24
# The strict app (beside the main one): API keys on, a memory budget, one Denoiser replica
# taking 2 requests, one request in flight per key, a 20 s deadline.
STRICT = "/strict"
STRICT_KEYS = {name: new_entry(name) for name in ("alice", "bob", "carol")}
# With the fit's margin 1536x1536 takes ~5.9 GiB: it fits; 2048x2048 (~10.5) does not.
STRICT_BUDGET = 8 * 2**30
STRICT_TIMEOUT_S = 20.0
# Runs past the strict deadline (~1 s a step at this size on the CPU).
LONG = {"prompt": "a long one", "size": "1536x1536", "num_inference_steps": 100}


def wait_for(predicate, timeout=30.0, every=0.05, why=None):
    """predicate()'s first true value, polling; fails the test after `timeout` s, with
    `why()` in the message if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting after {timeout} s" + (f": {why()}" if why else ""))


def serve_log_tail(app: str, deployment: str, lines: int = 60) -> str:
    """The last lines of the newest replica log of `app`'s `deployment` (this session's
    Ray logs), for a failure's message."""
    logs = Path("/tmp/ray/session_latest/logs/serve")
    found = sorted(logs.glob(f"replica_{app}_{deployment}_*.log"), key=lambda p: p.stat().st_mtime)
    if not found:
        return f"(no replica log of {app}/{deployment} under {logs})"
    tail = found[-1].read_text(errors="replace").splitlines()[-lines:]
    return f"{found[-1]}:\n" + "\n".join(tail)


def leave_stream_at(service, body: dict, request_id: str, step: int) -> None:
    """Stream `body` and leave (close the connection) as soon as denoising step `step`
    is reported done; fails if the stream ends first."""
    with (
        service.client() as http,
        http.stream(
            "POST",
            "/v1/images/generations",
            json={**body, "stream": True},
            headers={"X-Request-Id": request_id},
        ) as r,
    ):
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            event = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
            if event.get("stage") == "denoise" and event.get("step") == step:
                return
    raise AssertionError(f"the stream ended before step {step}")


def denoiser_record(service, request_id, model="zimage"):
    """The Denoiser's record of where a cancelled request stopped, or None."""
    return service.handle("Denoiser", model).cancellation.remote(request_id).result()


@pytest.fixture(scope="session")
def serve_checkpoint() -> Path:
    # The text encoder is wider than `tiny`'s so that encoding takes long enough to be
    # caught in the act by the cancellation tests; everything else is `tiny`.
    return ensure_tiny(cache_dir(), "zimage-serve-test-v2", text_hidden=512, text_layers=8)


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory, serve_checkpoint) -> dict[str, Path]:
    """Each model's adapter folder: its generated adapters, a corrupt file, the other
    family's adapter, and for SDXL a copy named after the niannian preset's adapter."""
    sdxl = resolve("tiny-sdxl")[0]
    folders = {}
    for model, checkpoint, other in (
        ("zimage", serve_checkpoint, sdxl),
        ("sdxl", sdxl, serve_checkpoint),
    ):
        folder = tmp_path_factory.mktemp(f"loras-{model}")
        for adapter in ("tiny-style.safetensors", "tiny-kohya.safetensors"):
            shutil.copy(checkpoint / "loras" / adapter, folder / adapter)
        shutil.copy(other / "loras" / "tiny-style.safetensors", folder / "other-family.safetensors")
        (folder / "broken.safetensors").write_bytes(os.urandom(2048))
        folders[model] = folder
    shutil.copy(
        folders["sdxl"] / "tiny-style.safetensors", folders["sdxl"] / "niannian.safetensors"
    )
    return folders


# The idle app (beside the main one): one model whose Denoiser scales to zero, none at
# the start, and gone again within seconds of its last request.
IDLE = "/idle"
IDLE_AUTOSCALING = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 1,
    "downscale_to_zero_delay_s": 3,
    "look_back_period_s": 2,
}


def side_app(name: str, model: dict, args: dict, env: dict) -> dict:
    """An app beside the main one at /<name>: the file's, with one zimage `model`, one
    Ingress replica and a tenth of a CPU for each replica (two cores in CI)."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    app = derived_app(config, name, f"/{name}", [{"id": "zimage", **model}], args, env)
    for d in app["deployments"]:
        if d["name"] == "Ingress":
            d.pop("autoscaling_config")  # one replica
        d["ray_actor_options"] = {**d.get("ray_actor_options", {}), "num_cpus": 0.1}
    return app


def idle_app(checkpoint: Path) -> dict:
    model = {"model": str(checkpoint), "lora_dir": None, "warmup_sizes": ["256x256"]}
    app = side_app(IDLE.strip("/"), model, {}, {})
    denoiser = next(d for d in app["deployments"] if d["name"] == "Denoiser-zimage")
    denoiser.pop("num_replicas")
    denoiser["autoscaling_config"] = IDLE_AUTOSCALING
    return app


def strict_app(checkpoint: Path) -> dict:
    entries = ",".join(entry for _, entry in STRICT_KEYS.values())
    return side_app(
        STRICT.strip("/"),
        {"model": str(checkpoint), "lora_dir": None,
         "memory": {"budget_bytes": STRICT_BUDGET}, "requests_per_replica": 2},
        {"request_timeout_s": STRICT_TIMEOUT_S, "api_keys": {"max_in_flight": 1}},
        {"T2I_API_KEYS": entries},
    )  # fmt: skip


# T2I_TEST_HAPROXY=1: the session's cluster serves HTTP through Ray's HAProxy and the
# ingress replicas' own servers (direct ingress) instead of Ray's Python proxy. Ray
# reads these in the cluster's processes, so they go into this process's environment
# before ray.init starts the cluster (an app's runtime_env is too late).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


@pytest.fixture(scope="session")
def service(tmp_path_factory, serve_checkpoint, lora_dirs):
    if os.environ.get("T2I_TEST_HAPROXY") == "1":
        os.environ.update(HAPROXY_ENV)
    with local_service(
        tmp_path_factory.mktemp("serve"),
        [
            # 24 a replica: the cancellation tests send 20 requests at once to one replica.
            {
                "id": "zimage",
                "model": str(serve_checkpoint),
                "lora_dir": str(lora_dirs["zimage"]),
                "requests_per_replica": MAIN_REQUESTS_PER_REPLICA,
            },
            {
                "id": "sdxl",
                "model": "tiny-sdxl",
                "lora_dir": str(lora_dirs["sdxl"]),
                "lora": {"slots": 2, "max_rank": 64, "cache_size": 8, "cache_bytes": 2**30},
                "requests_per_replica": MAIN_REQUESTS_PER_REPLICA,
            },
        ],
        num_gpus=NUM_GPUS,
        num_cpus=4,
        ingress_max_replicas=1,
        deployments={
            "Denoiser-sdxl": {"num_replicas": SDXL_REPLICAS},
            # Above what the models take in (24 + 2 x 24), with room to refuse what comes
            # past it: see the README's "Bounded queues". With 8 to spare (80), the 10x
            # overload's refusals waited at Ray's proxy for a slot (the 429s' p50 3.3 s)
            # or got its 503 (load_tests/results/cpu-2026-12-05-refusal-levers.json).
            "Ingress": {"max_ongoing_requests": 160},
        },
        extra_apps=[strict_app(serve_checkpoint), idle_app(serve_checkpoint)],
    ) as svc:
        yield svc
