"""The load tests (load_tests/loadtest.py) against the session's app on the CPU: overload
at 10x its capacity, and a storm of clients that leave at random points.

The runner runs as a subprocess (it runs locust, which patches the standard library with
gevent on import: never in this process, a Ray driver) and is judged by its JSON report.
Here, not in tests/load_tests/, to share the session's one app: a fixture is visible only
below its conftest, and one imported into another conftest would start a second app.
"""

import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from load_tests import traffic
from load_tests.local_service import ROOT
from tests.serve.conftest import SDXL_REPLICAS
from tests.serve.test_front_proxy import front_proxy

pytestmark = pytest.mark.serve

REPLICAS = {"zimage": 1, "sdxl": SDXL_REPLICAS}


def loadtest(service, out: Path, *args: str, url: str | None = None) -> dict:
    """Run the runner against the session's app (at `url`: in front of it); its report."""
    done = subprocess.run(
        [sys.executable, "-m", "load_tests.loadtest", "--url", url or service.url,
         "--metrics-url", service.metrics_url, "--metrics-settle", "3", "--out", str(out),
         *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    report = out.with_suffix(".json")
    assert report.exists(), f"the runner wrote no report:\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(report.read_text())


def figures(section: dict) -> str:
    keys = (
        "locust_s",
        "target_rps",
        "offered_rps",
        "throughput_ok_rps",
        "latency_ok",
        "status_counts",
        "outcomes",
        "refusals",
        "client_left",
        "client_loop_lag",
        "failures",
        "after",
        "service_outcomes_delta",
    )
    return json.dumps({k: section[k] for k in keys}, indent=1)


@pytest.fixture(scope="module")
def capacity(service, tmp_path_factory) -> float:
    """Answers/s of the app at saturation for the load tests' mix (a closed loop)."""
    report = loadtest(service, tmp_path_factory.mktemp("capacity") / "report", "--scenario",
                      "capacity", "--capacity-duration", "15")  # fmt: skip
    return report["capacity"]["rps"]


def seen_in(capacity: float, overload: dict, front=None) -> str:
    """A failed check's message: the capacity, the overload's figures and, through a
    front, the end of its log."""
    seen = f"capacity {capacity}/s; overload:\n{figures(overload)}"
    return f"{seen}\n{front.log()[-3000:]}" if front is not None else seen


def overload_at_10x(service, capacity: float, out: Path, front=None) -> dict:
    """60 s at 10x the app's capacity (through `front`'s url, with its log in a failure's
    message, where one is given); requests still waiting 30 s after the end are left
    (and counted as unfinished). The report's section, once checked for what every
    overload must hold: no 5xx but deliberate 503s, no wrong image, none unanswered, some
    drawn, and (10x what it can draw: a service that bounds its queue) some refused."""
    url = front.url if front is not None else None
    report = loadtest(service, out, "--scenario", "overload", "--duration", "60",
                      "--capacity", str(capacity), "--stop-timeout", "30", url=url)  # fmt: skip
    overload = report["scenarios"]["overload"]
    seen = seen_in(capacity, overload, front)
    assert overload["unexpected_5xx"] == 0, seen
    assert overload["wrong_images"] == 0, seen
    assert overload["outcomes"].get("no_answer", 0) == 0, seen
    assert overload["outcomes"].get("ok", 0) > 0, seen
    assert overload["refusals"]["n"] > 0, seen
    return overload


def test_overload_at_10x_refuses_fast_and_draws_only_correct_images(service, capacity, tmp_path):
    overload = overload_at_10x(service, capacity, tmp_path / "report")
    seen = seen_in(capacity, overload)
    refusals = overload["refusals"]
    # The target is every refusal within 100 ms; on this 2-core machine it is not met and
    # not held: a third to three quarters take longer. Each costs ~10 ms of CPU in Ray's
    # proxy and the ingress, most of it Ray Serve's own request path, and at 10x (~50
    # requests/s) they share two cores with the whole cluster and the load generator;
    # the ingress's one event loop is the busiest (load_tests/results/
    # cpu-2026-12-05-refusal-levers.md). Runs gave refusal p50s of 66 to 332 ms, p95s of
    # 0.3 to 1.3 s, maxima of 0.8 to 2.5 s; one clean-clone run that measured a capacity
    # of 5.86/s (59 requests/s offered, past what two cores refuse) p50 0.70 s, p95 2.3 s,
    # max 8.5 s. Held: refusals come at once rather than after a wait for the GPU (the
    # accepted requests waited 20-28 s at the median) or for an ingress slot (with 8 to
    # spare over what the models take in, p95 was 3.6 s).
    assert refusals["p50_ms"] <= 1000, seen
    assert refusals["p95_ms"] <= 3000, seen
    assert refusals["p95_ms"] <= overload["latency_ok"]["p50_ms"] / 5, seen
    assert not overload["after"]["stuck"], seen


def test_overload_at_10x_through_nginx_refuses_every_one_within_100_ms(service, capacity, tmp_path):
    # The shipped front proxy, as production runs it (README: "Behind a load balancer,
    # never bare"), with each model shed at what the app takes in; every locust client
    # comes from 127.0.0.1, so the per-address limit is lifted.
    upstream, workdir = service.url.removeprefix("http://"), tmp_path / "nginx"
    workdir.mkdir()
    with front_proxy(upstream, workdir, per_client=10_000) as front:
        overload = overload_at_10x(service, capacity, tmp_path / "report", front)
        seen = seen_in(capacity, overload, front)
    refusals = overload["refusals"]
    # Every refusal within 100 ms, net of the load generator's own stalls: it shares the 2
    # cores with the cluster, and the time its own loop stalled while a refusal was in
    # flight is not the front's (a clean-clone run had one refusal of 2584 at 265 ms on
    # the client's clock, in a run whose client loop stalled up to 252 ms). The client's
    # p99 holds without that correction.
    assert refusals["over_target_net_of_client_stalls"] == 0, seen
    assert refusals["p99_ms"] <= 100, seen
    # All of them nginx's: the service, whose slots free before nginx's (it closes a
    # request before its answer reaches the client), refused none.
    assert overload["service_outcomes_delta"]["rejected"] == 0, seen
    assert not overload["after"]["stuck"], seen


def described(service, model: str) -> dict[str, dict]:
    """describe() of every Denoiser replica of `model`, by replica id, through handle
    calls (each goes to one replica: call until each has answered)."""
    handle, seen = service.handle("Denoiser", model), {}
    deadline = time.monotonic() + 30
    while len(seen) < REPLICAS[model]:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {model}'s replicas answered"
        answer = handle.describe.remote().result(timeout_s=10)
        seen[answer["replica"]] = answer
    return seen


def stopped_stages(service, raw: Path) -> dict[str, int]:
    """Where the zimage Denoiser (one replica) says the storm's leaving requests stopped."""
    records = json.loads((raw / "storm.records.json").read_text())["records"]
    handle, stages = service.handle("Denoiser", "zimage"), {}
    for r in records:
        if r["outcome"] == "left" and r["model"] == "zimage":
            record = handle.cancellation.remote(r["id"]).result(timeout_s=10)
            stage = record["stage"] if record else "not at the denoiser"
            stages[stage] = stages.get(stage, 0) + 1
    return stages


def test_disconnect_storm_leaves_no_replica_stuck(service, capacity, tmp_path):
    # The storm ends once its leaves are spent; the window only bounds a slow machine's
    # run (once, in CI, only 187 of 200 leaves fit in a 55 s window).
    report = loadtest(service, tmp_path / "report", "--scenario", "storm", "--storm-within",
                      "150", "--leavers-total", "200", "--capacity", str(capacity))  # fmt: skip
    storm = report["scenarios"]["storm"]
    left = storm["client_left"]
    stages = stopped_stages(service, tmp_path / "report.locust")
    seen = f"stopped at the zimage denoiser: {stages}; storm:\n{figures(storm)}"
    assert left["n"] + sum(left["answered_first"].values()) == 200, seen
    assert left["n"] > 100 and left["service_cancelled"] > 0, seen
    # Left at random points: some before their loop started, some in it.
    assert stages.get("queued", 0) + stages.get("not at the denoiser", 0) > 0, seen
    assert stages.get("denoise", 0) > 0, seen
    assert storm["unexpected_5xx"] == 0 and storm["wrong_images"] == 0, seen

    # Nothing stuck: every Denoiser's queue is empty, per /readyz and per its handle...
    assert not storm["after"]["stuck"], seen
    for model in REPLICAS:
        depths = {rid: d["queue_depth"] for rid, d in described(service, model).items()}
        assert not any(depths.values()), (model, depths)

    # ...and every request after it is served, with a correct image.
    def draw(kind: traffic.Kind) -> traffic.Verdict:
        with service.client(timeout=60) as http:
            r = http.post(traffic.PATH, json=kind.body())
        return traffic.judge(r.status_code, r.headers.get("retry-after"), r.content, kind)

    later = [k for k in traffic.MIX if k.size == "256x256"] * 2
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        verdicts = list(pool.map(draw, later))
    assert [v.outcome for v in verdicts] == ["ok"] * len(later), verdicts
