"""One real Ray Serve application for the whole test session.

Ray starts with logical GPUs (the engine runs on the CPU); the app is deployed from
deploy/serve_config.yaml with the `serve run` CLI, as a user would, with test-only
changes: free ports, a test checkpoint, one Ingress replica.
"""

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from serve_app.engine.checkpoint import cache_dir
from serve_app.engine.tiny import ensure_tiny

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "serve_config.yaml"
APP = "t2i"
NUM_GPUS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_config(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@dataclass
class Service:
    url: str
    metrics_url: str
    config: dict

    def handle(self, deployment: str):
        return serve.get_deployment_handle(deployment, app_name=APP)

    def client(self, timeout: float = 120, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def serve_checkpoint() -> Path:
    # The text encoder is wider than `tiny`'s so that encoding takes long enough to be
    # caught in the act by the cancellation tests; everything else is `tiny`.
    return ensure_tiny(cache_dir(), "zimage-serve-test", text_hidden=512, text_layers=8)


@pytest.fixture(scope="session")
def service(tmp_path_factory, serve_checkpoint) -> Service:
    http_port, metrics_port = free_port(), free_port()
    ray.init(
        address="local",  # a new cluster, even if a dev one is running
        num_cpus=4,
        num_gpus=NUM_GPUS,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["model"]["model"] = str(serve_checkpoint)
    # Two cores in CI: keep them for the model replicas.
    deployment_config(config, "Ingress")["autoscaling_config"]["max_replicas"] = 1
    path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    serve_cli = Path(sys.executable).parent / "serve"
    address = ray.get_runtime_context().gcs_address
    subprocess.run(
        [str(serve_cli), "run", "--address", address, "--non-blocking", str(path)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not become ready: {serve.status()}")
        time.sleep(0.5)
    yield Service(url, f"http://127.0.0.1:{metrics_port}/metrics", config)
    serve.shutdown()
    ray.shutdown()
