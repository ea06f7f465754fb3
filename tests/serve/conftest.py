"""One real Ray Serve application for the whole test session.

Ray starts with logical GPUs (the engine runs on the CPU); the app is deployed from
deploy/serve_config.yaml with the `serve run` CLI, as a user would, with test-only
changes: free ports, a test checkpoint, one Ingress replica (two cores in CI).
"""

import time
from pathlib import Path

import pytest

from load_tests.local_service import local_service
from serve_app.engine.checkpoint import cache_dir
from serve_app.engine.tiny import ensure_tiny

NUM_GPUS = 2
# On the CPU a 1024x1024 step of the tiny transformer takes ~0.2 s and decoding one
# 1024x1024 image ~1.5 s: long enough to cancel in the act.
SLOW = {"prompt": "a slow one", "size": "1024x1024", "num_inference_steps": 60}


def wait_for(predicate, timeout=30.0, every=0.05):
    """predicate()'s first true value, polling; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def denoiser_record(service, request_id):
    """The Denoiser's record of where a cancelled request stopped, or None."""
    return service.handle("Denoiser").cancellation.remote(request_id).result()


@pytest.fixture(scope="session")
def serve_checkpoint() -> Path:
    # The text encoder is wider than `tiny`'s so that encoding takes long enough to be
    # caught in the act by the cancellation tests; everything else is `tiny`.
    return ensure_tiny(cache_dir(), "zimage-serve-test", text_hidden=512, text_layers=8)


@pytest.fixture(scope="session")
def service(tmp_path_factory, serve_checkpoint):
    with local_service(
        tmp_path_factory.mktemp("serve"),
        {"model": str(serve_checkpoint)},
        num_gpus=NUM_GPUS,
        num_cpus=4,
        ingress_max_replicas=1,
    ) as svc:
        yield svc
