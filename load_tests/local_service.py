"""Start the app on a local Ray cluster from deploy/serve_config.yaml, as a user would
(`serve run`), with overrides. Used by the test suite and the GPU benchmarks."""

import copy
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "serve_config.yaml"
APP = "t2i"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_config(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@dataclass
class LocalService:
    url: str
    metrics_url: str | None  # None on a cluster this did not start
    config: dict
    ready_s: float

    def handle(self, deployment: str, model: str = "zimage", app: str = APP):
        """A handle to a deployment; PromptEncoder and Denoiser: those of `model`."""
        from ray import serve

        if deployment in ("PromptEncoder", "Denoiser"):
            deployment = f"{deployment}-{model}"
        return serve.get_deployment_handle(deployment, app_name=app)

    def client(self, timeout: float = 120, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)


def derived_app(
    config: dict, name: str, route_prefix: str, models: list[dict], args: dict, env: dict
) -> dict:
    """Another application like the file's first, beside it on the same cluster: its own
    name, route prefix, models (as in make_config), `args` and environment changed."""
    app = copy.deepcopy(config["applications"][0])
    app.update(name=name, route_prefix=route_prefix)
    _pick_models(app, models)
    app["args"].update(args)
    app["runtime_env"]["env_vars"].update(env)
    return app


def _pick_models(application: dict, models: list[dict]) -> None:
    """Keep `models` (with their changes) and their deployments. A model with `like`
    names one of the file's: a copy of it, deployments included, under its own id."""
    by_id = {m["id"]: m for m in application["args"]["models"]}
    for model in models:
        if "like" in model:
            like = model["like"]
            by_id[model["id"]] = {**by_id[like], "id": model["id"]}
            for kind in ("PromptEncoder", "Denoiser"):
                copy_of = next(
                    d for d in application["deployments"] if d["name"] == f"{kind}-{like}"
                )
                application["deployments"].append(
                    {**copy.deepcopy(copy_of), "name": f"{kind}-{model['id']}"}
                )
    unknown = [m["id"] for m in models if m["id"] not in by_id]
    if unknown:
        raise KeyError(f"models {unknown} are not in {CONFIG}; it has {list(by_id)}")
    application["args"]["models"] = [
        {**by_id[m["id"]], **{k: v for k, v in m.items() if k != "like"}} for m in models
    ]
    dropped = {
        name
        for model_id in set(by_id) - {m["id"] for m in models}
        for name in (f"PromptEncoder-{model_id}", f"Denoiser-{model_id}")
    }
    application["deployments"] = [d for d in application["deployments"] if d["name"] not in dropped]


def make_config(
    models: list[dict] | None,
    ingress_max_replicas: int | None,
    port: int,
    deployments: dict[str, dict] | None = None,
    source: Path = CONFIG,
    args: dict | None = None,
    top_level: dict | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """A serve config file (`source`, deploy/serve_config.yaml by default) with a local
    HTTP port and overrides.

    Args:
        models: settings to change, one dict per model to serve, each with the `id` of a
            model in the file (or `like` one: a copy under a new id); models not listed
            are dropped with their deployments.
            None: every model as the file has it.
        ingress_max_replicas: caps the Ingress's autoscaling.
        port: the HTTP port.
        deployments: deployment name -> options to change (e.g. num_replicas).
        args: the application's other args to change (api_keys, limits...).
        top_level: the file's own keys to change (proxy_location...).
        env: environment variables to add to the application's runtime_env.
    """
    config = copy.deepcopy(yaml.safe_load(source.read_text()))
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = port
    application = config["applications"][0]
    if models is not None:
        _pick_models(application, models)
    for name, options in (deployments or {}).items():
        deployment_config(config, name).update(options)
    application["args"].update(args or {})
    if env:
        application.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    config.update(top_level or {})
    if ingress_max_replicas is not None:
        autoscaling = deployment_config(config, "Ingress")["autoscaling_config"]
        autoscaling["max_replicas"] = ingress_max_replicas
        autoscaling["min_replicas"] = min(autoscaling["min_replicas"], ingress_max_replicas)
    return config


def _ready(url: str) -> bool:
    try:
        ready = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return False
    return ready.status_code == 200 and ready.json()["status"] == "ready"


def _running(app: str) -> bool:
    """Whether Serve runs every replica of `app`; raises if its deployment failed (an
    import error, a replica constructor's): no use waiting for it to become ready."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is not None and status.status == "DEPLOY_FAILED":
        raise RuntimeError(f"application {app} failed to deploy:\n{status.message[-4000:]}")
    return status is not None and status.status == "RUNNING"


@contextmanager
def local_service(
    workdir: Path,
    models: list[dict] | None,
    num_gpus: int,
    num_cpus: int | None = None,
    ingress_max_replicas: int | None = None,
    ready_timeout_s: float = 300,
    deployments: dict[str, dict] | None = None,
    extra_apps: list[dict] | None = None,
    source: Path = CONFIG,
    address: str | None = None,
    args: dict | None = None,
    top_level: dict | None = None,
    env: dict[str, str] | None = None,
):
    """A Ray cluster of this process with `num_gpus` GPUs (logical ones where there are
    none), or the running one at `address`, and the app of `source` deployed by the
    `serve run` CLI; torn down on exit. `models`, `deployments`, `args`, `top_level`,
    `env`: see make_config; `extra_apps`: more applications beside it (see derived_app), ready
    too before this returns."""
    import ray
    from ray import serve

    http_port, metrics_port = free_port(), free_port()
    # Ray exports metrics every 10 s by default; a scrape-based check should not wait.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    if address is None:
        ray.init(
            address="local",  # a new cluster, even if another is running here
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            log_to_driver=False,
        )
    else:
        ray.init(address=address, log_to_driver=False)
    config = make_config(
        models, ingress_max_replicas, http_port, deployments, source, args, top_level, env
    )
    config["applications"] += extra_apps or []
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    # The `serve` CLI through this interpreter: a console script's shebang may name
    # another Python (packages installed with --target elsewhere).
    serve_cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    started = time.monotonic()
    try:
        deployed = subprocess.run(
            [*serve_cli, "run", "--address", ray.get_runtime_context().gcs_address,
             "--non-blocking", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )  # fmt: skip
        if deployed.returncode != 0:
            raise RuntimeError(f"serve run failed ({deployed.returncode}):\n"
                               f"{deployed.stderr[-4000:]}")  # fmt: skip
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + ready_timeout_s
        # Ready: every replica the config asks for is running (Serve's RUNNING app, not
        # only a /readyz that one replica per model answers), and each app says ready.
        # Serve's status costs ~100 ms of CPU: asked only once /readyz says ready.
        # Until then, Serve is asked every 10 s whether the deployment failed.
        for app in config["applications"]:
            prefix = app["route_prefix"].rstrip("/")
            asked = time.monotonic()
            while not (_ready(f"{url}{prefix}/readyz") and _running(app["name"])):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not become ready: {serve.status()}")
                if time.monotonic() - asked > 10:
                    _running(app["name"])
                    asked = time.monotonic()
                time.sleep(0.5)
        yield LocalService(
            url,
            f"http://127.0.0.1:{metrics_port}/metrics" if address is None else None,
            config,
            time.monotonic() - started,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
