"""Run the load tests' scenarios against a service and write a report.

    python -m load_tests.loadtest --scenario overload --url http://127.0.0.1:8000 \\
        --metrics-url http://127.0.0.1:8080/metrics --duration 60 \\
        --out load_tests/results/cpu-overload
    python -m load_tests.loadtest --local --scenario steady burst overload storm --duration 15

Each scenario runs locust headless in a subprocess (load_tests/locustfile.py): locust
patches the standard library with gevent on import, which must not happen in a process
that is a Ray driver (`--local` makes this one a driver) or runs pytest with Ray.
Without --capacity the service's capacity is measured first (the `capacity` scenario).

The report (<out>.json and a short <out>.md; locust's CSV and JSON statistics and the
raw records in <out>.locust/) holds per scenario: latency percentiles of the answered
requests, throughput, counts by status and by verdict, the latency of every refusal
(429/503), clients that left and the service's own count of cancelled requests (from
its metrics), device memory per replica (GET /readyz) and host memory per replica (the
RSS of the replicas' processes, when the service runs on this machine) at start and
end, and whether any replica is stuck afterwards. Exits 1 if any required check failed.
"""

import argparse
import datetime
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from load_tests import scenarios, traffic
from load_tests.sampling import Periodic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "load_tests" / "results"
LOCUSTFILE = "load_tests/locustfile.py"
REFUSAL_TARGET_S = 0.1
READYZ_PROBES = 8  # /readyz describes one replica per deployment: ask a few times
COUNTERS = {"ray_t2i_requests_total", "t2i_requests_total"}  # Ray adds ray_ on export
FAILED_ANSWERS = ("server_error", "deadline", "stream_error")
# Requests without a status to count: the client left, or locust stopped it at the end
# (after --stop-timeout) while it still waited.
NO_STATUS = ("left", "unfinished")


def percentiles(values: list[float]) -> dict:
    """n, p50, p95, p99 and max, in ms (nearest rank)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 2)

    return {
        "n": len(ordered),
        "p50_ms": rank(0.5),
        "p95_ms": rank(0.95),
        "p99_ms": rank(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def stalled_s(record: dict, stalls: Sequence[tuple[float, float]]) -> float:
    """How long the client's own event loop was stalled while `record` was in flight:
    each stall (the lag probe woke `lag` s late at `at`) blocked the loop from `at - lag`
    to `at`, and an answer that arrived then was read only after it."""
    start, end = record["t"], record["t"] + record["latency_s"]
    return sum(max(0.0, min(end, at) - max(start, at - lag)) for at, lag in stalls)


def summarise(records: list[dict], stalls: Sequence[tuple[float, float]] = ()) -> dict:
    """What the report says of one scenario's records (locustfile.record). Rates are
    over the time requests were sent (offered) and until the last answer (answered).
    `stalls`: the client's own (locustfile.STALLS), for refusals' latencies net of them."""
    first = min((r["t"] for r in records), default=0.0)
    sent_s = max((r["t"] for r in records), default=0.0) - first
    answered_s = max((r["t"] + r["latency_s"] for r in records), default=0.0) - first
    ok = [r for r in records if r["outcome"] == "ok"]
    refusals = [r for r in records if r["outcome"].startswith("refused")]
    refusal_s = [r["latency_s"] for r in refusals]
    # A refusal's latency less the time the client itself stalled meanwhile: what the
    # service took, on a machine where the load generator shares the cores.
    refusal_net_s = [r["latency_s"] - stalled_s(r, stalls) for r in refusals]
    by_status: dict[str, int] = {}
    by_outcome: dict[str, int] = {}
    for r in records:
        if r["outcome"] not in NO_STATUS:
            by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
    left = [r for r in records if r["outcome"] == "left"]
    storm = [r for r in records if "intent" in r and not r["outcome"].startswith("refused")]
    # A 503 is deliberate when it says when to come back; any other 5xx is not.
    unexpected_5xx = [
        r
        for r in records
        if r["outcome"] in FAILED_ANSWERS or (r["status"] == 503 and r["outcome"] != "refused")
    ]
    return {
        "requests": len(records),
        "duration_s": round(answered_s, 2),
        "offered_rps": round(len(records) / sent_s, 3) if sent_s else 0.0,
        "throughput_ok_rps": round(len(ok) / answered_s, 3) if answered_s else 0.0,
        "latency_ok": percentiles([r["latency_s"] for r in ok]),
        "latency_ok_by_kind": {
            kind: percentiles([r["latency_s"] for r in ok if r["kind"] == kind])
            for kind in sorted({r["kind"] for r in ok})
        },
        "status_counts": dict(sorted(by_status.items())),
        "outcomes": dict(sorted(by_outcome.items())),
        "refusals": {
            **percentiles(refusal_s),
            "codes": _count(r["code"] for r in refusals),
            "over_target": sum(s > REFUSAL_TARGET_S for s in refusal_s),
            "over_target_net_of_client_stalls": sum(s > REFUSAL_TARGET_S for s in refusal_net_s),
            "max_net_of_client_stalls_ms": round(max(refusal_net_s, default=0.0) * 1000, 2),
            "target_ms": REFUSAL_TARGET_S * 1000,
        },
        "unexpected_5xx": len(unexpected_5xx),
        "wrong_images": by_outcome.get("wrong_image", 0),
        "unfinished_at_stop": by_outcome.get("unfinished", 0),
        "failures": [
            {k: r[k] for k in ("kind", "status", "outcome", "code", "detail", "id")}
            for r in records
            if r["outcome"] not in ("ok", "refused", *NO_STATUS)
        ][:20],
        "client_left": {
            "n": len(left),
            # The storm's requests that were let in and then answered before they left.
            "answered_first": _count(r["outcome"] for r in storm if r["outcome"] != "left"),
            "by_intent": _count(r["intent"] for r in left),
            "where": _count(r["left"].split(" after")[0] for r in left),
        },
    }


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[str(item)] = counts.get(str(item), 0) + 1
    return dict(sorted(counts.items()))


# --- the service, seen from outside ---------------------------------------------------


def service_outcomes(metrics_url: str) -> dict[str, float]:
    """t2i_requests_total by outcome, summed over models and replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                outcome = sample.labels.get("outcome", "")
                totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


def settled_outcomes(metrics_url: str, settle_s: float, timeout_s: float = 60) -> dict:
    """service_outcomes once they have not changed for `settle_s` (Ray exports metrics
    every few seconds, and the last cancelled requests are counted as they unwind)."""
    last, since, deadline = service_outcomes(metrics_url), time.monotonic(), time.monotonic()
    deadline += timeout_s
    while time.monotonic() - since < settle_s and time.monotonic() < deadline:
        time.sleep(1)
        now = service_outcomes(metrics_url)
        if now != last:
            last, since = now, time.monotonic()
    return last


def replicas(url: str, probes: int = READYZ_PROBES) -> dict[str, dict]:
    """Every replica /readyz described in `probes` asks: deployment/replica id -> its
    device, queue depth and device memory ("vram")."""
    seen = {}
    for _ in range(probes):
        try:
            answer = httpx.get(f"{url}/readyz", timeout=15).json()
        except (httpx.HTTPError, ValueError):
            continue
        for model_id, model in answer.get("models", {}).items():
            for part, name in (("encoder", "PromptEncoder"), ("denoiser", "Denoiser")):
                if part in model:
                    d = model[part]
                    seen[f"{name}-{model_id}/{d['replica']}"] = {
                        "device": d["device"],
                        "queue_depth": d["queue_depth"],
                        "vram": d["vram"],
                    }
    return dict(sorted(seen.items()))


def replica_processes(url: str, app: str) -> list[tuple[str, psutil.Process]] | None:
    """(deployment, process) of each Ray Serve replica of application `app` of the
    service at `url`, if it runs on this machine: the children of the Ray node (raylet)
    whose proxy listens on its port, by their process titles
    ("ray::ServeReplica:<app>:<deployment>", with ".<method>" while one runs). None if no
    process here listens on that port."""
    port = urlsplit(url).port or 80
    try:
        listening = [
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        ]
    except psutil.AccessDenied:
        return None
    if not listening:
        return None
    try:
        node = psutil.Process(listening[0]).parent()
        children = node.children(recursive=True) if node is not None else []
    except psutil.Error:
        return None
    found = []
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if f"ServeReplica:{app}:" in title:
            deployment = title.split(f"ServeReplica:{app}:")[1].split()[0].split(".")[0]
            found.append((deployment, child))
    return found


def host_memory(url: str, app: str) -> list[dict] | None:
    """RSS of each replica's process (see replica_processes), or None."""
    processes = replica_processes(url, app)
    if processes is None:
        return None
    out = []
    for deployment, p in processes:
        try:
            out.append({"replica": deployment, "pid": p.pid, "rss": p.memory_info().rss})
        except psutil.Error:
            continue
    return sorted(out, key=lambda m: (m["replica"], m["pid"]))


def memory(url: str, app: str) -> dict:
    """Device memory of each replica (describe()'s "vram"; 0 on a CPU) and host memory
    (RSS) of each replica's process; `host` is None for a service not on this machine."""
    return {
        "at": round(time.time(), 1),
        "device": {name: r["vram"] for name, r in replicas(url).items()},
        "host": host_memory(url, app),
    }


def fresh_request(url: str, model: str, timeout_s: float) -> dict:
    kind = traffic.Kind(f"{model}-fresh", model, "256x256", 4, False, 1)
    started = time.monotonic()
    try:
        r = httpx.post(f"{url}{traffic.PATH}", json=kind.body(), timeout=timeout_s)
    except httpx.HTTPError as exc:
        return {"model": model, "status": 0, "outcome": "no_answer", "detail": repr(exc)}
    verdict = traffic.judge(r.status_code, r.headers.get("retry-after"), r.content, kind)
    return {
        "model": model,
        "status": r.status_code,
        "outcome": verdict.outcome,
        "latency_ms": round((time.monotonic() - started) * 1000, 1),
    }


def stuck_check(url: str, models: list[str], drain_s: float, fresh_s: float) -> dict:
    """After a scenario: every Denoiser's queue back to 0 within `drain_s`, and then a
    small request of each model answered with a correct image within `fresh_s`."""
    started, depths = time.monotonic(), {}
    while True:
        depths = {n: r["queue_depth"] for n, r in replicas(url).items() if n.startswith("Denoiser")}
        if (depths and not any(depths.values())) or time.monotonic() - started > drain_s:
            break
        time.sleep(0.5)
    drained = bool(depths) and not any(depths.values())
    fresh = [fresh_request(url, m, fresh_s) for m in models]
    return {
        "queue_depths": depths,
        "drained_in_s": round(time.monotonic() - started, 2) if drained else None,
        "fresh": fresh,
        "stuck": not drained or any(f["outcome"] != "ok" for f in fresh),
    }


# --- one scenario ---------------------------------------------------------------------


def run_locust(args, url: str, scenario: str, capacity: float, duration: float, raw: Path):
    """Run the locustfile headless in a subprocess: its records, the lateness of its
    event loop (samples, s) and how long it ran."""
    records_path = raw / f"{scenario}.records.json"
    command = [
        sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--host", url,
        "--scenario", scenario, "--capacity", str(capacity), "--duration", str(duration),
        "--closed-users", str(args.closed_users), "--leavers", str(args.leavers),
        "--leavers-total", str(args.leavers_total), "--leave-within", str(args.leave_within),
        "--pacing", str(args.pacing), "--records", str(records_path),
        "--csv", str(raw / scenario), "--json-file", str(raw / scenario),
        "--only-summary", "--stop-timeout", str(args.stop_timeout),
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    started = time.monotonic()
    with open(raw / f"{scenario}.log", "w") as log:
        done = subprocess.run(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=duration + args.stop_timeout + 300,
        )
    took = time.monotonic() - started
    if done.returncode != 0 or not records_path.exists():
        tail = (raw / f"{scenario}.log").read_text()[-3000:]
        raise RuntimeError(f"locust ({scenario}) exited with {done.returncode}:\n{tail}")
    written = json.loads(records_path.read_text())
    return written["records"], written["client_lag_s"], written["client_stalls"], took


def measure_capacity(args, url: str, raw: Path) -> dict:
    """Answers/s of the closed loop, after its first seconds (connections, warm-up)."""
    duration = args.capacity_duration
    records, _, _, _ = run_locust(args, url, "capacity", 0.0, duration, raw)
    warm = min(3.0, duration / 4)
    ends = [r["t"] + r["latency_s"] for r in records if r["outcome"] == "ok"]
    counted = [e for e in ends if e >= warm]
    span = (max(counted) - warm) if counted else 0.0
    rps = len(counted) / span if span > 0 else 0.0
    if rps <= 0:
        raise RuntimeError(f"the capacity run answered nothing: {summarise(records)}")
    return {
        "rps": round(rps, 3),
        "source": "measured",
        "users": args.closed_users,
        "duration_s": duration,
        "run": summarise(records),
    }


def run_scenario(
    args,
    url: str,
    metrics_url: str | None,
    scenario: str,
    capacity: float,
    raw: Path,
    models: list[str],
) -> dict:
    if scenario == "storm":
        duration = args.storm_within
    else:
        duration = args.duration or scenarios.DEFAULT_DURATION_S[scenario]
    start_memory = memory(url, args.app)
    before = service_outcomes(metrics_url) if metrics_url else None
    with Periodic(lambda: memory(url, args.app), args.sample_every) as sampler:
        records, lags, stalls, took = run_locust(args, url, scenario, capacity, duration, raw)
    section = {
        "scenario": scenario,
        "target_rps": [
            round(s.rate_rps, 3)
            for s in scenarios.plan(scenario, capacity, duration, args.closed_users, args.leavers)
        ],
        "planned_s": duration,
        "locust_s": round(took, 1),
        **summarise(records, stalls),
        # Latencies are measured by the client: they hold its own delays, up to this.
        "client_loop_lag": percentiles(lags),
    }
    section["after"] = stuck_check(url, models, args.drain_timeout, args.fresh_timeout)
    section["memory"] = {
        "start": start_memory,
        "end": memory(url, args.app),
        "samples": [reading for _, reading in sampler.samples],
    }
    if metrics_url:
        after = settled_outcomes(metrics_url, args.metrics_settle)
        delta = {k: round(v - before.get(k, 0.0)) for k, v in after.items()}
        section["service_outcomes_delta"] = delta
        section["client_left"]["service_cancelled"] = delta.get("cancelled", 0)
    else:
        section["client_left"]["service_cancelled"] = None
    section["checks"] = checks(section)
    return section


def checks(section: dict) -> dict:
    """Required checks (the exit code) and the refusal-latency target, of one scenario."""
    outcomes = section["outcomes"]
    refusals = section["refusals"]
    return {
        "no_5xx_but_deliberate_503": section["unexpected_5xx"] == 0,
        "accepted_answered_with_correct_image": section["wrong_images"] == 0,
        "every_client_answered": outcomes.get("no_answer", 0) + outcomes.get("left_499", 0) == 0,
        "no_replica_stuck": not section["after"]["stuck"],
        "target_refusals_within_100ms": refusals["n"] == 0 or refusals["over_target"] == 0,
    }


def failed(report: dict) -> list[str]:
    return [
        f"{name}: {check}"
        for name, section in report["scenarios"].items()
        for check, passed in section["checks"].items()
        if not passed and not check.startswith("target_")
    ]


# --- the report -----------------------------------------------------------------------


def device_name(url: str) -> str:
    """The device's name: cpu for a service on the CPU, else the GPU's (nvidia-smi here)."""
    devices = {r["device"] for r in replicas(url, 2).values()}
    if devices <= {"cpu"}:
        return "cpu"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip().replace(" ", "-")
    return "gpu"


def default_stem(device: str, scenario_names: list[str]) -> Path:
    date = datetime.date.today().isoformat()
    base = f"{device}-{date}-loadtest-{'-'.join(scenario_names)}"
    n = 1
    while (RESULTS / f"{base}-{n}.json").exists():
        n += 1
    return RESULTS / f"{base}-{n}"


def markdown(report: dict) -> str:
    cap = report["capacity"]
    lines = [
        f"# Load test, {report['device']}, {report['date']}",
        "",
        f"Service {report['url']}; capacity {cap['rps']} answers/s ({cap['source']}"
        + (
            f", closed loop of {cap['users']} clients for {cap['duration_s']} s"
            if cap["source"] == "measured"
            else ""
        )
        + "); "
        f"commit {report['commit']}. Raw records and locust's CSV/JSON: `{report['raw']}`.",
        "",
        "| scenario | target rps | offered rps | ok rps | ok p50 / p95 / p99 ms | statuses "
        "| refusals: n, p99 / max ms | left (client / service) | stuck | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["scenarios"].items():
        lat, ref, left = s["latency_ok"], s["refusals"], s["client_left"]
        statuses = ", ".join(f"{k}: {v}" for k, v in s["status_counts"].items())
        if s["unfinished_at_stop"]:
            statuses += f", unanswered at the end: {s['unfinished_at_stop']}"
        bad = [k for k, v in s["checks"].items() if not v]
        lines.append(
            f"| {name} | {'/'.join(str(r) for r in s['target_rps'])} | {s['offered_rps']} "
            f"| {s['throughput_ok_rps']} | {lat.get('p50_ms', '-')} / {lat.get('p95_ms', '-')}"
            f" / {lat.get('p99_ms', '-')} | {statuses} | {ref['n']}, {ref.get('p99_ms', '-')}"
            f" / {ref.get('max_ms', '-')} | {left['n']} / {left['service_cancelled']} "
            f"| {'yes' if s['after']['stuck'] else 'no'} | {'; '.join(bad) or 'pass'} |"
        )
    lines += [
        "",
        "Memory per replica, start -> end of each scenario (device: allocated bytes; host: RSS):",
        "",
    ]
    for name, s in report["scenarios"].items():
        start, end = s["memory"]["start"], s["memory"]["end"]
        device = ", ".join(
            f"{r}: {start['device'].get(r, {}).get('allocated', '-')} -> {v.get('allocated', '-')}"
            for r, v in end["device"].items()
        )
        if end["host"] is None:
            host = "not measured (the service is not on this machine): device memory only"
        else:
            before = {m["pid"]: m["rss"] for m in start["host"] or []}
            host = ", ".join(
                f"{m['replica']} ({m['pid']}): {_mib(before.get(m['pid']))} -> {_mib(m['rss'])}"
                for m in end["host"]
            )
        lines += [f"- **{name}** device: {device}", f"  host: {host}"]
    if report["failed"]:
        lines += ["", "Failed: " + "; ".join(report["failed"])]
    return "\n".join(lines) + "\n"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def run(args, url: str, metrics_url: str | None) -> dict:
    models = sorted(httpx.get(f"{url}/readyz", timeout=15).json()["models"])
    device = device_name(url)
    stem = Path(args.out) if args.out else default_stem(device, args.scenario)
    stem = stem.with_suffix("") if stem.suffix == ".json" else stem
    raw = stem.parent / f"{stem.name}.locust"
    raw.mkdir(parents=True, exist_ok=True)
    if args.capacity:
        capacity = {"rps": args.capacity, "source": "given"}
    else:
        capacity = measure_capacity(args, url, raw)
        print(f"capacity: {capacity['rps']} answers/s", flush=True)
    report = {
        "url": url,
        "metrics_url": metrics_url,
        "device": device,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "models": models,
        "capacity": capacity,
        "raw": str(raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw),
        "scenarios": {},
    }
    for scenario in args.scenario:
        if scenario == "capacity":
            continue
        section = run_scenario(args, url, metrics_url, scenario, capacity["rps"], raw, models)
        report["scenarios"][scenario] = section
        print(f"{scenario}: {json.dumps(_brief(section))}", flush=True)
    report["failed"] = failed(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"report: {stem}.json, {stem}.md", flush=True)
    return report


def _brief(section: dict) -> dict:
    keys = ("offered_rps", "throughput_ok_rps", "latency_ok", "status_counts", "refusals")
    return {**{k: section[k] for k in keys}, "checks": section["checks"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", nargs="+", choices=scenarios.SCENARIOS, default=["steady"])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the service, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--local",
        action="store_true",
        help="start deploy/serve_config.yaml here (a local Ray cluster)",
    )
    p.add_argument(
        "--metrics-url", help="its Prometheus endpoint, e.g. http://127.0.0.1:8080/metrics"
    )
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds per scenario but the storm; default: {scenarios.DEFAULT_DURATION_S}",
    )
    p.add_argument(
        "--storm-within",
        type=float,
        default=scenarios.DEFAULT_DURATION_S["storm"],
        help="the longest the storm may take to spend its leaves (s)",
    )
    p.add_argument("--capacity", type=float, help="answers/s at saturation; default: measured")
    p.add_argument("--capacity-duration", type=float, default=15.0, help="s of its measurement")
    p.add_argument("--closed-users", type=int, default=12, help="clients measuring capacity")
    p.add_argument("--leavers", type=int, default=32, help="the storm's concurrent leavers")
    p.add_argument("--leavers-total", type=int, default=200, help="the storm's leaves in all")
    p.add_argument("--leave-within", type=float, default=3.0, help="longest delay to leave (s)")
    p.add_argument("--pacing", type=float, default=1.0, help="mean gap of one open-loop client")
    p.add_argument(
        "--stop-timeout",
        type=int,
        default=60,
        help="s a client may take to finish its request when locust stops it",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="s the Denoisers' queues may take to drain after a scenario",
    )
    p.add_argument(
        "--fresh-timeout", type=float, default=10.0, help="s a small request may take afterwards"
    )
    p.add_argument(
        "--metrics-settle",
        type=float,
        help="s the service's counters must hold still before they are read; "
        "default 12 (Ray exports every 10 s), 3 with --local (every second)",
    )
    p.add_argument("--sample-every", type=float, default=30.0, help="s between memory samples")
    p.add_argument("--app", default="t2i", help="the Ray Serve application's name (host memory)")
    p.add_argument("--gpus", type=int, default=1, help="--local: GPUs (logical ones on a CPU)")
    p.add_argument("--cpus", type=int, default=4, help="--local: Ray's logical CPUs")
    p.add_argument(
        "--out",
        help="report path without suffix; default: load_tests/results/"
        "<device>-<date>-loadtest-<scenarios>-<n>",
    )
    args = p.parse_args(argv)
    if args.metrics_url is None and not args.local:
        print("no --metrics-url: the service's own cancelled count is not read", file=sys.stderr)
    if args.metrics_settle is None:  # local_service has Ray export every second
        args.metrics_settle = 3.0 if args.local else 12.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local:
        from load_tests.local_service import local_service

        workdir = tempfile.TemporaryDirectory()
        service = local_service(Path(workdir.name), None, num_gpus=args.gpus, num_cpus=args.cpus)
    else:
        workdir, service = nullcontext(), nullcontext()
    with workdir, service as svc:
        url, metrics_url = (
            (svc.url, svc.metrics_url) if args.local else (args.url, args.metrics_url)
        )
        report = run(args, url.rstrip("/"), metrics_url)
    for failure in report["failed"]:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
