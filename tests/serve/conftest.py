"""One real Ray Serve application for the whole test session.

Ray starts with logical GPUs (the engine runs on the CPU); the app is deployed from
deploy/serve_config.yaml with the `serve run` CLI, as a user would, with test-only
changes: free ports, test checkpoints and adapter folders, one Ingress replica (two
cores in CI), two Denoiser replicas for SDXL (adapter routing).
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from load_tests.local_service import local_service
from serve_app.engine.checkpoint import cache_dir, resolve
from serve_app.engine.zimage.tiny import ensure_tiny

NUM_GPUS = 2
# On the CPU a 1024x1024 step of the tiny transformer takes ~0.2 s and decoding one
# 1024x1024 image ~1.5 s: long enough to cancel in the act.
SLOW = {"prompt": "a slow one", "size": "1024x1024", "num_inference_steps": 60}
SDXL_REPLICAS = 2


def wait_for(predicate, timeout=30.0, every=0.05):
    """predicate()'s first true value, polling; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


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


@pytest.fixture(scope="session")
def service(tmp_path_factory, serve_checkpoint, lora_dirs):
    with local_service(
        tmp_path_factory.mktemp("serve"),
        [
            {"id": "zimage", "model": str(serve_checkpoint), "lora_dir": str(lora_dirs["zimage"])},
            {
                "id": "sdxl",
                "model": "tiny-sdxl",
                "lora_dir": str(lora_dirs["sdxl"]),
                "lora": {"slots": 2, "max_rank": 64, "cache_size": 8, "cache_bytes": 2**30},
            },
        ],
        num_gpus=NUM_GPUS,
        num_cpus=4,
        ingress_max_replicas=1,
        deployments={"Denoiser-sdxl": {"num_replicas": SDXL_REPLICAS}},
    ) as svc:
        yield svc
