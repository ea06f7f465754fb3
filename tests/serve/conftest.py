"""One real Ray Serve application for the whole test session.

Ray starts with logical GPUs (the engine runs on the CPU); the app is deployed from
deploy/serve_config.yaml with the `serve run` CLI, as a user would, with test-only
changes: free ports, a test checkpoint, one Ingress replica (two cores in CI).
"""

from pathlib import Path

import pytest

from load_tests.local_service import local_service
from serve_app.engine.checkpoint import cache_dir
from serve_app.engine.tiny import ensure_tiny

NUM_GPUS = 2


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
