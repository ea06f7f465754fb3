"""The dashboard and the Prometheus rules read series that the service really exports.

A real Prometheus (Debian's package; `make test` installs it) scrapes this session's Ray
with deploy/prometheus/prometheus.yml, adapted only in where Ray's service-discovery file
is and how often to scrape. After ok, invalid and cancelled requests, every query of
every dashboard panel and every recording rule must return series, and every alert must
evaluate with data under the quantity it compares. The alert thresholds themselves are
checked by promtool's rule tests on series made for each case.
"""

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from load_tests.local_service import ROOT, free_port
from tests.serve.conftest import (
    SDXL_REPLICAS,
    SLOW,
    denoiser_record,
    leave_stream_at,
    wait_for,
)

pytestmark = pytest.mark.serve

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARD = ROOT / "dashboards" / "t2i.json"
# What Grafana would put in place of its variables: every value of ours, and windows
# long enough to hold several of this test's 1 s scrapes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "10m",
    "$application": ".*",
    "$model": ".*",
    "$deployment": ".*",
    "$replica": ".*",
    "$stage": ".*",
}
SMALL = {"prompt": "a small one", "size": "256x256", "num_inference_steps": 2}
# SLOW (conftest): a client that leaves it after its second step leaves in the step loop.


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: `make test` installs Debian's prometheus package "
            "(apt-get install prometheus), which has prometheus and promtool"
        )
    return path


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title + refId, PromQL) of every panel target of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def rules(kind: str) -> list[dict]:
    """The recording ("record") or alert ("alert") rules of rules.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if kind in rule]


def compared_quantity(expr: str) -> str:
    """The part of an alert expression left of its first comparison outside brackets and
    quotes: the quantity the alert holds against a threshold."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and (ch in "<>" or expr[i : i + 2] in ("==", "!=")):
            return expr[:i].strip()
        i += 1
    raise AssertionError(f"the alert compares nothing with a threshold: {expr}")


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now; fails on any evaluation error."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert body["status"] == "success", f"{expr}\n-> {body.get('error')}"
        return body["data"]["result"]

    def get(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()["data"]


def post(service, body: dict, timeout: float = 120, request_id: str | None = None):
    headers = {"X-Request-Id": request_id} if request_id else {}
    with service.client(timeout=timeout) as http:
        return http.post("/v1/images/generations", json=body, headers=headers)


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    # The file Ray's dashboard writes (it is off in tests), with the same content: every
    # live node's metrics export address.
    targets = [
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        for node in ray.nodes()
        if node["Alive"]
    ]
    discovery = workdir / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))

    config = yaml.safe_load(CONFIG.read_text())
    ray_jobs = [job for job in config["scrape_configs"] if "file_sd_configs" in job]
    assert [
        Path(f).name for job in ray_jobs for sd in job["file_sd_configs"] for f in sd["files"]
    ] == [discovery.name]
    ray_jobs[0]["file_sd_configs"] = [{"files": [str(discovery)]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while not prom_is_up(prom):
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus did not scrape Ray within 60 s"
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def prom_is_up(prom: Prometheus) -> bool:
    try:
        return bool(prom.query('up{job="ray"} == 1'))
    except (httpx.HTTPError, ValueError):
        return False


@pytest.fixture(scope="module")
def traffic(service, prometheus, lora_dirs) -> Prometheus:
    """Prometheus, once it has scraped ok, invalid and cancelled requests."""
    for _ in range(3):
        assert post(service, SMALL).status_code == 200
    assert post(service, {**SMALL, "size": "250x256"}).status_code == 400
    victim = f"leaves-{uuid.uuid4().hex[:8]}"
    leave_stream_at(service, SLOW, victim, 2)  # once its loop is under way
    wait_for(lambda: denoiser_record(service, victim))  # the Denoiser recorded the cancel
    assert post(service, SMALL).status_code == 200
    # An adapter read afresh (a replaced file is loaded again: a miss, timed), and one
    # refused: the LoRA panels' series.
    adapter = lora_dirs["zimage"] / "tiny-style.safetensors"
    os.utime(adapter, ns=(time.time_ns(), time.time_ns()))
    assert post(service, {**SMALL, "lora": {"name": "tiny-style"}}).status_code == 200
    assert post(service, {**SMALL, "lora": {"name": "broken"}}).status_code == 422
    return prometheus


def series_of(prom: Prometheus, service, exprs: dict[str, str], timeout: float = 90) -> dict:
    """{name: result} of each expression, waiting until all have series or `timeout`.

    While some are empty, a small request goes in each round: Ray exports a gauge only
    while it is being set (for 2 export intervals after), and the queue-depth gauges
    are set by requests."""
    deadline = time.monotonic() + timeout
    while True:
        results = {name: prom.query(expr) for name, expr in exprs.items()}
        if all(results.values()) or time.monotonic() > deadline:
            return results
        post(service, SMALL)
        time.sleep(1)


def test_every_dashboard_query_returns_series(traffic, service):
    queries = {name: substitute(expr) for name, expr in dashboard_queries()}
    assert len(queries) >= 20
    results = series_of(traffic, service, queries)
    empty = [f"{name}: {queries[name]}" for name, result in results.items() if not result]
    assert not empty, "dashboard queries without series:\n" + "\n".join(empty)


def test_every_dashboard_variable_has_values(traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert match, f"${var['name']}: not a label_values query: {var['definition']}"
        selector, label = substitute(match[1]), match[2]
        values = traffic.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert values, f"${var['name']} has no values: {var['definition']}"


def test_every_recording_rule_returns_series(traffic, service):
    recording = {rule["record"]: rule["expr"] for rule in rules("record")}
    results = series_of(traffic, service, recording)
    empty = [name for name, result in results.items() if not result]
    assert not empty, f"recording rules without series: {empty}"


def test_every_served_model_counts_its_healthy_denoisers(traffic, service):
    """The healthy-replica count per model that T2IDenoiserDown compares, on the live
    app: each model's own Denoiser replicas, none counted under another's name."""
    expected = {"zimage": 1, "sdxl": SDXL_REPLICAS}
    expr = "application_model:t2i_denoiser_healthy_replicas:sum"
    deadline = time.monotonic() + 60
    while True:
        got = {r["metric"]["model"]: float(r["value"][1]) for r in traffic.query(expr)}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == expected


def test_every_alert_evaluates_and_its_quantity_has_series(traffic, service):
    alerts = rules("alert")
    assert {a["alert"] for a in alerts} >= {
        "T2IEndToEndLatencyHigh",
        "T2IVramLow",
        "T2IOutOfMemory",
        "T2IRejectedShareHigh",
        "T2ICancelledShareHigh",
        "T2IDenoiserDown",
    }
    quantities = {a["alert"]: compared_quantity(a["expr"]) for a in alerts}
    results = series_of(traffic, service, quantities)
    empty = [f"{name}: {quantities[name]}" for name, result in results.items() if not result]
    assert not empty, "alerts whose compared quantity has no series:\n" + "\n".join(empty)
    for alert in alerts:
        traffic.query(alert["expr"])  # evaluates without error; firing or not


def test_prometheus_loaded_every_rule_and_evaluates_them_cleanly(traffic):
    loaded = [rule for group in traffic.get("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert {r["name"] for r in loaded} == {
        r.get("record") or r.get("alert") for r in rules("record") + rules("alert")
    }
    broken = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not broken, broken


def test_promtool_accepts_the_config_and_the_rules():
    promtool = binary("promtool")
    for args in (["check", "config", str(CONFIG)], ["check", "rules", str(RULES)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_imports_without_edits():
    """Grafana imports it as is: the data source is a variable, not a uid of ours."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        sources = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("outcome", "latency", "step", "vram peak", "vram per replica", "queue"):
        assert topic in titles
    for topic in ("replicas", "cancel", "oom"):
        assert topic in titles


# --- alert thresholds, on series made for each case -----------------------------------


def _histogram(name: str, labels: str, bounds: list[float], at_least: float) -> list[dict]:
    """Bucket series of a histogram that gets one observation a minute, of `at_least`."""
    return [
        {
            "series": f'{name}_bucket{{{labels},le="{le}"}}',
            "values": "0+1x20" if le >= at_least else "0x20",
        }
        for le in [*bounds, float("inf")]
    ]


def _alert_cases() -> list[dict]:
    """(alert, input series, the label values it must fire for); the other series in
    each case are ones it must not fire for."""
    from serve_app.metrics import STAGE_SECONDS

    def health(app: str, value: str, model: str = "m") -> dict:
        labels = f'application="{app}",deployment="Denoiser-{model}",replica="r-{app}-{model}"'
        return {"series": f"ray_serve_deployment_replica_healthy{{{labels}}}", "values": value}

    def requests(app: str, outcome: str, per_minute: int, model: str = "m") -> dict:
        labels = f'application="{app}",model="{model}",outcome="{outcome}"'
        return {"series": f"ray_t2i_requests_total{{{labels}}}", "values": f"0+{per_minute}x20"}

    def vram(replica: str, free: float, total: float) -> list[dict]:
        labels = f'application="t2i",deployment="Denoiser-m",replica="{replica}"'
        return [
            {"series": f'ray_t2i_vram_bytes{{{labels},kind="{kind}"}}', "values": f"{v}x20"}
            for kind, v in (("free", free), ("total", total))
        ]

    e2e = "ray_t2i_stage_latency_seconds"
    return [
        {
            "alert": "T2IEndToEndLatencyHigh",
            "series": _histogram(e2e, 'application="slow",stage="e2e"', STAGE_SECONDS, 15)
            + _histogram(e2e, 'application="fast",stage="e2e"', STAGE_SECONDS, 2)
            + _histogram(e2e, 'application="slowdenoise",stage="denoise"', STAGE_SECONDS, 15),
            "fires_for": ["slow"],
        },
        {
            "alert": "T2IVramLow",
            # 4 of 80 GB free; 40 of 80 GB free; a CPU replica reads 0 of 0.
            "series": vram("full", 4e9, 80e9) + vram("roomy", 40e9, 80e9) + vram("cpu", 0, 0),
            "fires_for": ["full"],
        },
        {
            "alert": "T2IOutOfMemory",
            "series": [
                {"series": 'ray_t2i_oom_total{application="oom"}', "values": "0 0 0 1x17"},
                {"series": 'ray_t2i_oom_total{application="fine"}', "values": "0x20"},
            ],
            "fires_for": ["oom"],
        },
        {
            "alert": "T2IRejectedShareHigh",
            "series": [
                requests("busy", "ok", 9),
                requests("busy", "rejected", 1),  # 10%
                requests("calm", "ok", 99),
                requests("calm", "rejected", 1),  # 1%
            ],
            "fires_for": ["busy"],
        },
        {
            "alert": "T2ICancelledShareHigh",
            "series": [
                requests("leaving", "ok", 1),
                requests("leaving", "cancelled", 1),  # 50%
                requests("staying", "ok", 9),
                requests("staying", "cancelled", 1),  # 10%
            ],
            "fires_for": ["leaving"],
        },
        {
            "alert": "T2IDenoiserDown",
            "series": [
                health("up", "1x20"),
                requests("up", "ok", 1),
                health("stopped", "1 1 1 0 0 0 0 0 0 0 0 0"),
                requests("stopped", "ok", 1),
                requests("gone", "ok", 1),  # its Denoiser exports no health at all
                # One model down, the other up: it fires for that model alone.
                health("half", "1x20", "a"),
                requests("half", "ok", 1, "a"),
                requests("half", "ok", 1, "b"),
                requests("early", "invalid", 1, "unknown"),  # refused before a model
            ],
            "fires_for": [("gone", "m"), ("half", "b"), ("stopped", "m")],
        },
        {
            "alert": "RayMetricsDown",
            "series": [
                {"series": 'up{job="ray",instance="down:8080"}', "values": "0x20"},
                {"series": 'up{job="ray",instance="up:8080"}', "values": "1x20"},
            ],
            "fires_for": ["down:8080"],
        },
    ]


def test_alerts_fire_past_their_thresholds_and_only_there(tmp_path):
    """Each alert's expression at 10 minutes, on series on both sides of its threshold
    (VRAM: a CPU replica, 0 of 0 bytes, must not fire)."""
    exprs = {a["alert"]: a["expr"] for a in rules("alert")}
    cases = _alert_cases()
    assert sorted(c["alert"] for c in cases) == sorted(exprs), "an alert without a case"
    key = {
        "T2IVramLow": ["replica"],
        "RayMetricsDown": ["instance"],
        "T2IDenoiserDown": ["application", "model"],
    }
    tests = []
    for case in cases:
        labels = key.get(case["alert"], ["application"])
        samples = []
        for value in case["fires_for"]:
            values = value if isinstance(value, tuple) else (value,)
            pairs = ",".join(f'{k}="{v}"' for k, v in zip(labels, values, strict=True))
            samples.append({"labels": f"{{{pairs}}}", "value": 1})
        tests.append(
            {
                "interval": "1m",
                "input_series": case["series"],
                "promql_expr_test": [
                    {
                        "expr": f"group by ({', '.join(labels)}) ({exprs[case['alert']]})",
                        "eval_time": "10m",
                        "exp_samples": samples,
                    }
                ],
            }
        )
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        [binary("promtool"), "test", "rules", str(spec)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- counts that follow known traffic --------------------------------------------------
# Every counter is exported at 0 from the start (start_at_zero), so "the series exists"
# holds with the counting deleted: these tests send known traffic and assert how much
# each count grew. The service is shared by the session, so each reads its counts first.


def exported(service, name: str, by: str, **match: str) -> dict[str, float]:
    """Ray's export of counter `name` (e.g. "ray_t2i_requests_total"): samples whose
    labels equal `match`, summed by the value of label `by` over the other labels
    (replicas, models)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(service.metrics_url, timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == name and all(labels.get(k) == v for k, v in match.items()):
                counts[labels[by]] = counts.get(labels[by], 0.0) + sample.value
    return counts


def grown(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in now.items()}


def settled(read, expected, timeout: float = 30):
    """read() once it equals `expected`, or its last value after `timeout` s (Ray exports
    every second in tests, and the ingress counts an answered request after sending it)."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_lora_hits_misses_and_errors_are_counted(service, lora_dirs):
    def lora_counts() -> dict[str, float]:
        return exported(service, "ray_t2i_lora_loads_total", "result", model="zimage")

    before = lora_counts()
    adapter = lora_dirs["zimage"] / "tiny-kohya.safetensors"
    os.utime(adapter, ns=(time.time_ns(), time.time_ns()))  # replaced: read again
    body = {**SMALL, "lora": {"name": "tiny-kohya"}}
    assert post(service, body).status_code == 200  # a miss
    assert post(service, body).status_code == 200  # a hit
    assert post(service, {**SMALL, "lora": {"name": "broken"}}).status_code == 422  # an error
    expected = {"miss": 1.0, "hit": 1.0, "error": 1.0}
    assert settled(lambda: grown(lora_counts(), before), expected) == expected


def outcomes(service) -> dict[str, float]:
    """t2i_requests_total by outcome, over every model (and "unknown")."""
    return exported(service, "ray_t2i_requests_total", "outcome")


def cancelled_steps(service) -> float:
    counts = exported(service, "ray_t2i_cancelled_steps_total", "model", model="zimage")
    return counts.get("zimage", 0.0)


def test_each_outcome_and_the_steps_a_cancel_saved_are_counted(service, prometheus):
    """Two invalid requests (one refused before its model is known), a client that leaves
    in the step loop, one ok: each outcome's count grows by exactly that, the cancelled
    steps by the steps the Denoiser did not run, and Prometheus scrapes the new totals."""
    before, steps_before = outcomes(service), cancelled_steps(service)
    with service.client() as http:
        bad_json = http.post("/v1/images/generations", content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert post(service, {**SMALL, "size": "250x256"}).status_code == 400
    victim = f"leaves-{uuid.uuid4().hex[:8]}"
    leave_stream_at(service, SLOW, victim, 2)  # once its loop is under way
    record = wait_for(lambda: denoiser_record(service, victim))
    assert record["stage"] == "denoise"
    not_run = record["steps_total"] - record["steps_done"]
    assert not_run > 0
    assert post(service, SMALL).status_code == 200

    expected = {
        "ok": 1.0,
        "invalid": 2.0,
        "cancelled": 1.0,
        "rejected": 0.0,
        "oom": 0.0,
        "error": 0.0,
        "cancelled steps": float(not_run),
    }

    def counted() -> dict[str, float]:
        return {
            **grown(outcomes(service), before),
            "cancelled steps": cancelled_steps(service) - steps_before,
        }

    assert settled(counted, expected) == expected

    # What Prometheus scraped: the same totals as the export now.
    totals = {**outcomes(service), "cancelled steps": cancelled_steps(service)}

    def scraped() -> dict[str, float]:
        by_outcome = prometheus.query("sum by (outcome) (ray_t2i_requests_total)")
        steps = prometheus.query('sum(ray_t2i_cancelled_steps_total{model="zimage"})')
        return {
            **{r["metric"]["outcome"]: float(r["value"][1]) for r in by_outcome},
            "cancelled steps": float(steps[0]["value"][1]) if steps else 0.0,
        }

    assert settled(scraped, totals) == totals
