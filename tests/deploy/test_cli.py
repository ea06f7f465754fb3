"""The operator's own tools against the cluster `make serve` starts (scripts/serve), as
the README's "Operating it" says: `serve status`, `serve deploy`, `serve config` and
`serve shutdown`, through the CLI itself, with Ray 2.60's token authentication.

scripts/serve ends with `ray stop --force`, which stops every Ray process on the
machine: this runs before tests/serve starts the session's cluster, never beside one.
"""

import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from load_tests.local_service import ROOT, free_port
from tests.serve.test_readme import snippet
from training.evaluate import colour_at, colour_away

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
    (tmp_path / "home").mkdir()
    env = {
        **os.environ,
        "RAY_PORT": str(free_port()),
        "DASHBOARD_PORT": str(dashboard_port),
        "METRICS_PORT": str(free_port()),
        "PATH": f"{SERVE.parent}:{os.environ['PATH']}",
        # As on a fresh machine: no ~/.ray/auth_token yet (scripts/serve makes one).
        "HOME": str(tmp_path / "home"),
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
        # The README's first example, as written, draws what it asks of the embedded
        # default (the demo model).
        curl = snippet("sh", "a red circle").replace("http://127.0.0.1:8000", url)
        subprocess.run(["bash", "-c", curl], cwd=tmp_path, check=True, timeout=120)
        circle = np.asarray(Image.open(tmp_path / "circle.png").convert("RGB"))
        assert circle.shape == (256, 256, 3)
        assert (colour_at(circle, "centre"), colour_away(circle, ["centre"])) == ("red", "blue")
        # Without the token the CLI is refused (what an operator saw before the README
        # said what to set); with RAY_AUTH_MODE=token it finds ~/.ray/auth_token.
        assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
        refused = cli("status", auth=False)
        assert refused.returncode != 0 and "auth" in refused.stderr.lower()
        assert status()["applications"]["t2i"]["status"] == "RUNNING"

        # serve deploy: a changed config reaches the running app; its replicas are
        # replaced, and the old ones drain: a request drawing when the deploy comes in
        # is finished, not dropped (graceful_shutdown_timeout_s above request_timeout_s).
        config["applications"][0]["args"]["request_timeout_s"] = 123
        path.write_text(yaml.safe_dump(config))
        long = {"prompt": "a white star at the bottom on a blue background", "seed": 2,
                "size": "512x512", "num_inference_steps": 60, "guidance_scale": 0}  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            drawing = pool.submit(httpx.post, f"{url}/generate", json=long, timeout=300)
            time.sleep(5)  # encoded, drawing
            assert not drawing.done(), drawing.result().text
            deployed = cli("deploy", str(path))
            assert deployed.returncode == 0, deployed.stderr[-2000:]
            # The app was being redeployed while the request still ran.
            updating = status()["applications"]["t2i"]["status"] != "RUNNING"
            assert updating and not drawing.done(), "the deploy came after the request"
            drained = drawing.result()
        assert drained.status_code == 200, drained.text
        assert Image.open(io.BytesIO(drained.content)).size == (512, 512)
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
