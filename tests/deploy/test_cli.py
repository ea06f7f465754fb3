"""The operator's own tools against the cluster `make serve` starts (scripts/serve), as
the README's "Operating it" says: `serve status`, `serve deploy`, `serve config` and
`serve shutdown`, through the CLI itself, with Ray 2.60's token authentication.

scripts/serve ends with `ray stop --force`, which stops every Ray process on the
machine: this runs before tests/serve starts the session's cluster, never beside one.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from load_tests.local_service import ROOT, free_port

SERVE = Path(sys.executable).with_name("serve")


def wait_until(predicate, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s; scripts/serve:\n"
                                 f"{log.read_text()[-4000:]}")  # fmt: skip
        time.sleep(1)


def ready(url: str) -> bool:
    try:
        answer = httpx.get(f"{url}/readyz", timeout=10)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and answer.json()["status"] == "ready"


def test_serve_cli_drives_the_cluster_make_serve_starts(tmp_path):
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    http_port, dashboard_port = free_port(), free_port()
    config["http_options"]["port"] = http_port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_PORT": str(free_port()),
        "DASHBOARD_PORT": str(dashboard_port),
        "METRICS_PORT": str(free_port()),
        "PATH": f"{SERVE.parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_AUTH_MODE", None)  # as in a fresh shell
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http_port}"

    def cli(*args: str, auth: bool = True) -> subprocess.CompletedProcess:
        # What the README tells an operator to type in a second shell.
        shell = {**env, "RAY_AUTH_MODE": "token"} if auth else env
        return subprocess.run(
            [str(SERVE), *args, "--address", f"http://127.0.0.1:{dashboard_port}"],
            env=shell, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def status() -> dict:
        done = cli("status")
        assert done.returncode == 0, done.stderr[-2000:]
        return yaml.safe_load(done.stdout)

    with log.open("w") as out:
        serving = subprocess.Popen(
            ["scripts/serve", str(path)], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: ready(url), 300, "make serve was not ready", log)
        # Without the token the CLI is refused (what an operator saw before the README
        # said what to set); with RAY_AUTH_MODE=token it finds ~/.ray/auth_token.
        refused = cli("status", auth=False)
        assert refused.returncode != 0 and "auth" in refused.stderr.lower()
        assert status()["applications"]["t2i"]["status"] == "RUNNING"

        # serve deploy: a changed config reaches the running app.
        config["applications"][0]["args"]["request_timeout_s"] = 123
        path.write_text(yaml.safe_dump(config))
        deployed = cli("deploy", str(path))
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        wait_until(
            lambda: yaml.safe_load(cli("config").stdout)["args"]["request_timeout_s"] == 123,
            120, "serve config did not show the deployed change", log,
        )  # fmt: skip
        wait_until(
            lambda: status()["applications"]["t2i"]["status"] == "RUNNING" and ready(url),
            300, "the redeployed app was not running", log,
        )  # fmt: skip
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200

        # serve shutdown: the app goes, the cluster stays.
        shut = cli("shutdown", "-y")
        assert shut.returncode == 0, shut.stderr[-2000:]
        wait_until(lambda: not status().get("applications"), 120, "apps remained", log)
    finally:
        os.killpg(serving.pid, signal.SIGINT)  # Ctrl-C: the script's trap stops Ray
        try:
            serving.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
