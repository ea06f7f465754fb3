"""Locust users and load shape of the service's load tests (load_tests/scenarios.py).

Run by load_tests/loadtest.py as a subprocess, never imported by a process that is a
Ray driver or runs pytest with Ray: locust patches the standard library with gevent on
import. To run it alone, from the repository's root:

    locust -f load_tests/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --scenario steady --capacity 10 --duration 60 --records /tmp/records.json

Users:
- Drawer: sends a request of the mix (traffic.MIX) at its own pace and judges the answer;
  the shape sets how many there are so that together they keep the stage's rate.
- ClosedLoopDrawer: the same, sending again as soon as it is answered (capacity), or a
  moment after a refusal.
- Leaver: sends a request of traffic.LEAVING and closes the connection at a random
  point: after a short delay (most likely still queued), after any delay up to
  --leave-within (queued, encoding, denoising or decoding), or for a streamed one
  after a random number of its progress events (mid-denoise, by the service's own
  account). The storm's clients share a budget of --leavers-total leaves.

Every request is recorded (kind, status, latency, verdict); the records go to --records
as JSON when locust quits, for the runner's report.
"""

import http.client
import itertools
import json
import math
import random
import time
import uuid
from collections import deque
from urllib.parse import urlsplit

import gevent
from locust import FastHttpUser, LoadTestShape, User, events, task

from load_tests import scenarios, traffic

MAX_USERS = 1000  # open connections, at most: what a 2-core client machine can hold
SPAWN_RATE = 200  # users a second: a burst starts at once
LEAVER_WAIT_S = 60.0  # a leaver gives up on a stream whose first event is this late
RATE_WINDOW_S = 3.0  # the shape measures the drawers' rate over this many seconds
LAG_PROBE_S = 0.01  # the sleep whose lateness measures this process's own delays

T0 = time.monotonic()
RECORDS: list[dict] = []
LAGS: deque[float] = deque(maxlen=100_000)
# The probe's wake-ups later than STALL_S: (when, since T0; how late), for the runner to
# tell a client's own stall from a slow answer.
STALL_S = 0.005
STALLS: list[tuple[float, float]] = []
STARTS: deque[float] = deque(maxlen=100_000)  # when each drawer's request started


class Budget:
    """The storm's leaves: how many are left to start, how many are under way."""

    def __init__(self) -> None:
        self.left = 0
        self.running = 0


LEAVES = Budget()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("t2i load tests")
    group.add_argument("--scenario", choices=scenarios.SCENARIOS, default="steady")
    group.add_argument("--capacity", type=float, default=1.0, help="answers/s at saturation")
    group.add_argument("--duration", type=float, default=60.0, help="seconds")
    group.add_argument(
        "--closed-users", type=int, default=12, help="closed-loop clients (capacity)"
    )
    group.add_argument("--leavers", type=int, default=32, help="concurrent leavers (storm)")
    group.add_argument("--leavers-total", type=int, default=200, help="leaves in all (storm)")
    group.add_argument(
        "--leave-within", type=float, default=3.0, help="the longest delay before leaving (s)"
    )
    group.add_argument("--pacing", type=float, default=1.0, help="a drawer's mean gap (s)")
    group.add_argument("--records", default="", help="where to write the records (JSON)")


@events.init.add_listener
def _init(environment, **kwargs) -> None:
    options = environment.parsed_options
    if options is not None:
        LEAVES.left = options.leavers_total if options.scenario == "storm" else 0


@events.test_start.add_listener
def _watch_lag(environment, **kwargs) -> None:
    gevent.spawn(_lag_probe)


def _lag_probe() -> None:
    """How late this process's event loop wakes a 10 ms sleep: what a latency measured
    here may hold of the client's own delay (a busy machine, a busy locust)."""
    while True:
        slept = time.monotonic()
        gevent.sleep(LAG_PROBE_S)
        woke = time.monotonic()
        lag = woke - slept - LAG_PROBE_S
        LAGS.append(lag)
        if lag > STALL_S:
            STALLS.append((round(woke - T0, 4), round(lag, 5)))


@events.quitting.add_listener
def _write(environment, **kwargs) -> None:
    options = environment.parsed_options
    if options is not None and options.records:
        with open(options.records, "w") as f:
            lags = [round(x, 5) for x in LAGS]
            json.dump({"records": RECORDS, "client_lag_s": lags, "client_stalls": STALLS}, f)


def record(kind: traffic.Kind, started: float, latency_s: float, status: int, verdict, **extra):
    RECORDS.append(
        {
            "t": round(started - T0, 4),
            "kind": kind.name,
            "model": kind.model,
            "stream": kind.stream,
            "status": status,
            "latency_s": round(latency_s, 5),
            "outcome": verdict.outcome,
            "code": verdict.code,
            "detail": verdict.detail,
            **extra,
        }
    )


class Drawer(FastHttpUser):
    """Sends a request of the mix about every --pacing seconds (uniformly jittered)."""

    network_timeout = 600.0
    connection_timeout = 30.0
    weight = 1

    def on_start(self) -> None:
        self.last_start, self.gap, self.refused = 0.0, 0.0, False
        gevent.sleep(self.stagger())

    def stagger(self) -> float:
        """A random part of a gap before the first request: drawers added at once (a
        stage's start, the shape adding some) do not all send at once."""
        return random.uniform(0.0, self.environment.parsed_options.pacing)

    def wait_time(self) -> float:
        return max(0.0, self.gap - (time.monotonic() - self.last_start))

    @task
    def draw(self) -> None:
        pacing = self.environment.parsed_options.pacing
        self.gap = random.uniform(0.5 * pacing, 1.5 * pacing)
        started = time.monotonic()
        STARTS.append(started)
        self.last_start = started
        kind = traffic.draw(traffic.MIX)
        request_id = f"load-{uuid.uuid4().hex[:16]}"
        try:
            status, latency, verdict = self._send(kind, request_id, started)
        except gevent.GreenletExit:  # stopped by locust at the end, still waiting
            unfinished = traffic.Verdict("unfinished")
            record(kind, started, time.monotonic() - started, 0, unfinished, id=request_id)
            raise
        self.refused = verdict.outcome.startswith("refused")
        record(kind, started, latency, status, verdict, id=request_id)

    def _send(self, kind: traffic.Kind, request_id: str, started: float):
        """POST one request and judge its answer: (status, latency, verdict)."""
        with self.client.post(
            traffic.PATH,
            json=kind.body(),
            headers={"X-Request-Id": request_id},
            name=kind.name,
            catch_response=True,
        ) as response:
            latency = time.monotonic() - started
            status = response.status_code or 0
            if status == 0:
                verdict = traffic.Verdict("no_answer", None, repr(response.error))
            else:
                retry_after = response.headers.get("Retry-After") if response.headers else None
                verdict = traffic.judge(status, retry_after, response.content or b"", kind)
            if verdict.outcome == "ok":
                response.success()
            else:  # locust's failures.csv then counts every other outcome by its name
                response.failure(f"{status} {verdict.outcome} {verdict.code or ''}".strip())
        return status, latency, verdict


class ClosedLoopDrawer(Drawer):
    """A Drawer that sends again as soon as it is answered, or a moment after a refusal
    (sending again at once would only load the service's admission, not its models)."""

    def stagger(self) -> float:
        return 0.0

    def wait_time(self) -> float:
        return random.uniform(0.05, 0.15) if self.refused else 0.0


class Leaver(User):
    """Sends a request and closes its connection at a random point (see the module). A
    refused request spends none of the storm's budget: it is sent again after a moment."""

    fixed_count = 0  # set by the shape to the storm's number of leavers

    def on_start(self) -> None:
        self.refused = False

    def wait_time(self) -> float:
        return random.uniform(0.1, 0.5) if self.refused else random.uniform(0.0, 0.2)

    @task
    def leave(self) -> None:
        if LEAVES.left <= 0:
            gevent.sleep(0.5)  # the storm is over; the shape stops the test
            return
        LEAVES.left -= 1
        LEAVES.running += 1
        try:
            self.refused = self._leave().startswith("refused")
            if self.refused:
                LEAVES.left += 1
        finally:
            LEAVES.running -= 1

    def _leave(self) -> str:
        """Send one request and leave; the verdict's outcome."""
        kind = traffic.draw(traffic.LEAVING)
        if kind.stream:
            intent, after = "stream", random.randint(1, kind.steps + 1)
        elif random.random() < 1 / 3:
            intent, after = "early", random.uniform(0.005, 0.15)
        else:
            intent, after = "anywhere", random.uniform(0.005, self.options.leave_within)
        url = urlsplit(self.host)
        request_id = f"storm-{uuid.uuid4().hex[:16]}"
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=LEAVER_WAIT_S)
        started = time.monotonic()
        status, body, retry_after, left, sent = 0, b"", None, None, False
        verdict = None
        try:
            conn.request(
                "POST",
                traffic.PATH,
                body=json.dumps(kind.body()),
                headers={"Content-Type": "application/json", "X-Request-Id": request_id},
            )
            sent = True
            if kind.stream:
                status, body, retry_after, left = self._read_stream(conn, after)
            else:
                status, body, retry_after, left = self._read_until(conn, started + after)
        except TimeoutError as exc:  # a stream silent for LEAVER_WAIT_S: it leaves then
            if sent:
                left = f"gave up: nothing for {LEAVER_WAIT_S:.0f} s"
            else:
                verdict = traffic.Verdict("no_answer", None, repr(exc))
        except (OSError, http.client.HTTPException) as exc:
            verdict = traffic.Verdict("no_answer", None, repr(exc))
        finally:
            conn.close()
        latency = time.monotonic() - started
        if verdict is None:
            if left is not None:
                verdict = traffic.Verdict("left")
            else:
                verdict = traffic.judge(status, retry_after, body, kind)
        record(
            kind,
            started,
            latency,
            status,
            verdict,
            id=request_id,
            intent=intent,
            leave_after=round(after, 4),
            left=left,
        )
        return verdict.outcome

    @property
    def options(self):
        return self.environment.parsed_options

    @staticmethod
    def _read_until(conn: http.client.HTTPConnection, deadline: float):
        """The answer, if it comes before `deadline`; else leave (left: where)."""
        conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            response = conn.getresponse()
            body = response.read()
        except TimeoutError:
            return 0, b"", None, "waiting"
        return response.status, body, response.getheader("Retry-After"), None

    @staticmethod
    def _read_stream(conn: http.client.HTTPConnection, progress_events: int):
        """Read the stream and leave after `progress_events` progress events (the last
        one is sent as decoding starts); a refusal is answered before any event."""
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.read(), response.getheader("Retry-After"), None
        seen, lines = 0, []
        while line := response.readline():
            lines.append(line)
            if line.startswith(b"event: image_generation.progress"):
                seen += 1
                if seen >= progress_events:
                    return 200, b"", None, f"stream after {seen} progress events"
        return 200, b"".join(lines), None, None


class Scenario(LoadTestShape):
    """Follows the plan of --scenario (scenarios.plan) and stops at its end.

    Open-loop stages keep their rate whatever the answers take: a drawer sends about
    once per --pacing when answered sooner, less often when not, so the shape counts the
    requests started over the last seconds and adds drawers while that is under the
    stage's rate (up to twice as many each second), or removes some when well over it
    (a drawer removed finishes its request first: --stop-timeout).
    """

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[scenarios.Stage] | None = None
        self.stage: scenarios.Stage | None = None
        self.stage_started = 0.0
        self.drawers = 0

    def tick(self):
        options = self.runner.environment.parsed_options
        if self.plan is None:
            self.plan = scenarios.plan(
                options.scenario,
                options.capacity,
                options.duration,
                options.closed_users,
                options.leavers,
            )
        now = self.get_run_time()
        stage = next((s for s in self.plan if now < s.until_s), None)
        storm_over = options.scenario == "storm" and LEAVES.left <= 0 and LEAVES.running == 0
        if stage is None or storm_over:
            return None
        if stage.closed_users:
            return stage.closed_users, SPAWN_RATE, [ClosedLoopDrawer]
        self.size_drawers(stage, now, options.pacing)
        if stage.leavers:
            Leaver.fixed_count = stage.leavers
            return self.drawers + stage.leavers, SPAWN_RATE, [Drawer, Leaver]
        return self.drawers, SPAWN_RATE, [Drawer]

    def size_drawers(self, stage: scenarios.Stage, now: float, pacing: float) -> None:
        least = max(1, math.ceil(stage.rate_rps * pacing))  # if every answer came at once
        if stage is not self.stage:  # scaled from the last stage's, which had adapted
            scale = stage.rate_rps / self.stage.rate_rps if self.stage else 1.0
            self.drawers = max(least, math.ceil(self.drawers * scale))
            self.stage, self.stage_started = stage, now
            return
        if now - self.stage_started < RATE_WINDOW_S:
            return
        since = time.monotonic() - RATE_WINDOW_S
        started = sum(1 for _ in itertools.takewhile(lambda t: t > since, reversed(STARTS)))
        rate = started / RATE_WINDOW_S
        if rate < 0.9 * stage.rate_rps:
            grow = min(2.0, stage.rate_rps / max(rate, stage.rate_rps / 4))
            self.drawers = min(MAX_USERS, math.ceil(self.drawers * grow))
        elif rate > 1.2 * stage.rate_rps:
            self.drawers = max(least, math.floor(self.drawers * stage.rate_rps / rate))
