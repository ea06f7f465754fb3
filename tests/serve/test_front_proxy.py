"""nginx in front of the service with deploy/nginx/t2i.conf as shipped, only its CHANGE
lines pointed at this test's ports: Ray Serve's trusted-caller headers never reach the
service, streams pass unbuffered, a client that leaves cancels its work, a body over the
limit is refused before it is read, each model is refused past what the service takes in
of it, and the headers the service needs reach it. A real
nginx (Debian's package; `make test` installs it) and the session's real service.
"""

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from load_tests.local_service import ROOT, free_port
from serve_app.ingress.guard import TRUSTED_ONLY
from tests.serve.conftest import (
    MAIN_REQUESTS_PER_REPLICA,
    SDXL_REPLICAS,
    SLOW,
    denoiser_record,
    wait_for,
)
from tests.serve.test_cancel import rid
from tests.serve.test_streaming import events

pytestmark = pytest.mark.serve

CONFIG = ROOT / "deploy" / "nginx" / "t2i.conf"
SMALL = {"prompt": "x", "size": "256x256", "num_inference_steps": 2}
# A value for each header of the guard's that switches its behaviour on.
SWITCHED_ON = {"x-request-disconnect-disabled": "?1", "x-request-timeout-seconds": "0"}
NGINX_REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # $request_id; Ray's are UUIDs
# What the session's app takes in of each model (requests_per_replica x Denoisers).
TAKEN_IN = {
    "zimage": MAIN_REQUESTS_PER_REPLICA,
    "sdxl": MAIN_REQUESTS_PER_REPLICA * SDXL_REPLICAS,
}

# What Debian's /etc/nginx/nginx.conf puts around conf.d/*.conf (gzip on included), with
# every path in the test's folder. As root, workers run as root: `nobody`, nginx's
# default, could not enter pytest's 0700 temp folders.
MAIN = """\
{user}
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{
    worker_connections 1024;
}}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    gzip on;
    include {dir}/t2i.conf;
}}
"""


def nginx_binary() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH may not have.
    path = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if path is None:
        pytest.fail(
            "`nginx` is not installed: `make test` installs Debian's nginx package "
            "(apt-get install nginx)"
        )
    return path


def render(upstream: str, port: int, workdir: Path, shed: dict[str, int], per_client: int) -> str:
    """deploy/nginx/t2i.conf with its CHANGE lines set to this test's addresses, each
    model's generations in flight capped at `shed`'s number and a client's at
    `per_client`."""
    text = CONFIG.read_text()
    assert text.count("limit_conn t2i_per_client 16;") == 2, "both generation locations"
    text = text.replace("limit_conn t2i_per_client 16;", f"limit_conn t2i_per_client {per_client};")
    second_pass = free_port()
    for line, new in (
        ("server 127.0.0.1:8000;", f"server {upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("access_log /var/log/nginx/t2i.access.log t2i;", f"access_log {workdir}/access.log t2i;"),
        ("server 127.0.0.1:8081;", f"server 127.0.0.1:{second_pass};"),
        ("listen 127.0.0.1:8081;", f"listen 127.0.0.1:{second_pass};"),
        *(
            (f"limit_conn t2i_shed_{model} 4;", f"limit_conn t2i_shed_{model} {n};")
            for model, n in shed.items()
        ),
    ):
        assert text.count(line) == 1, f"{CONFIG} should have `{line}` once, to be changed"
        text = text.replace(line, new)
    return text


@dataclass
class FrontProxy:
    url: str
    workdir: Path

    def log(self, name: str = "error.log") -> str:
        path = self.workdir / name
        return path.read_text() if path.exists() else f"(no {name})"

    def client(self, timeout: float = 120, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def front_proxy(
    upstream: str, workdir: Path, shed: dict[str, int] = TAKEN_IN, per_client: int = 16
) -> Iterator[FrontProxy]:
    """nginx in the foreground, with the shipped config in front of `upstream`
    (host:port), shedding each model past `shed`'s number and a client's generations
    past `per_client`; stopped on exit. Its logs are in `workdir`."""
    port = free_port()
    (workdir / "t2i.conf").write_text(render(upstream, port, workdir, shed, per_client))
    user = "user root;" if os.geteuid() == 0 else ""
    (workdir / "nginx.conf").write_text(MAIN.format(user=user, dir=workdir))
    proc = subprocess.Popen(
        [
            nginx_binary(),
            "-p", str(workdir),
            "-c", str(workdir / "nginx.conf"),
            "-e", str(workdir / "error.log"),  # errors before the config is read
            "-g", "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxy = FrontProxy(f"http://127.0.0.1:{port}", workdir)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert proc.poll() is None, f"nginx exited:\n{proxy.log()}"
            assert time.monotonic() < deadline, f"nginx did not listen within 30 s:\n{proxy.log()}"
            time.sleep(0.05)
        yield proxy
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def front(service, tmp_path_factory) -> Iterator[FrontProxy]:
    with front_proxy(service.url.removeprefix("http://"), tmp_path_factory.mktemp("nginx")) as p:
        yield p


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


@pytest.mark.parametrize("header", TRUSTED_ONLY)
def test_ray_serve_switches_are_refused_directly_and_stripped_by_nginx(service, front, header):
    headers = {header: SWITCHED_ON[header]}
    with service.client() as http:
        direct = http.post("/v1/images/generations", json=SMALL, headers=headers)
    assert direct.status_code == 400
    assert direct.json()["error"]["param"] == header
    assert error_code(direct) == "forbidden_header"

    with front.client() as http:
        proxied = http.post("/v1/images/generations", json=SMALL, headers=headers)
    assert proxied.status_code == 200, (proxied.text, front.log())
    assert proxied.json()["data"][0]["b64_json"]


def test_the_request_id_is_the_clients_or_nginxs_in_answer_and_log(front):
    with front.client() as http:
        mine = http.post("/v1/images/generations", json=SMALL, headers={"X-Request-Id": "mine-1"})
        theirs = http.post("/v1/images/generations", json=SMALL)
    assert mine.status_code == theirs.status_code == 200, front.log()
    assert mine.headers["x-request-id"] == "mine-1"
    # Without one, the service got nginx's (Ray would have made a UUID), and the access
    # log names the request by it.
    given = theirs.headers["x-request-id"]
    assert NGINX_REQUEST_ID.fullmatch(given), given
    ids = ("rid=mine-1 ", f"rid={given} ")
    wait_for(lambda: all(i in front.log("access.log") for i in ids))


class Echo(BaseHTTPRequestHandler):
    """An upstream that answers every request with the headers it arrived with."""

    protocol_version = "HTTP/1.1"  # keepalive, as nginx asks for

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-echo-path", self.path)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_what_reaches_the_upstream_is_the_clients_headers_less_the_switches(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sent = {**SWITCHED_ON, "Authorization": "Bearer sk-test-123", "X-Request-Id": "abc"}
    try:
        with front_proxy(f"127.0.0.1:{server.server_port}", tmp_path) as proxy, proxy.client() as c:
            got = c.post("/v1/images/generations", json=SMALL, headers=sent).json()
            unnamed = dict(c.post("/v1/images/generations", json=SMALL).json())
            empty = dict(c.post("/generate", json=SMALL, headers={"X-Request-Id": ""}).json())
    finally:
        server.shutdown()
        server.server_close()
    names = [name for name, _ in got]
    assert not set(TRUSTED_ONLY) & set(names), got
    got = dict(got)
    assert got["authorization"] == "Bearer sk-test-123"
    assert got["x-request-id"] == "abc"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert "connection" not in got  # not "close": the connection is kept for the next one
    assert NGINX_REQUEST_ID.fullmatch(unnamed["x-request-id"])
    assert NGINX_REQUEST_ID.fullmatch(empty["x-request-id"])


class Slow(Echo):
    """An upstream whose every answer takes a second: requests stay in flight."""

    def do_POST(self):
        time.sleep(1)
        super().do_POST()


def test_past_16_generations_in_flight_a_client_gets_429_with_retry_after(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with front_proxy(f"127.0.0.1:{server.server_port}", tmp_path) as proxy:

            def post(_):
                with proxy.client() as c:
                    return c.post("/generate", json=SMALL)

            with concurrent.futures.ThreadPoolExecutor(17) as pool:
                running = [pool.submit(post, i) for i in range(17)]
                time.sleep(0.3)  # 16 in flight (a second each), one refused: a cancel is
                # still never limited
                assert sum(f.done() for f in running) <= 1, [f.result() for f in running]
                with proxy.client() as c:
                    cancel = c.post("/v1/requests/x/cancel")
                answers = [f.result() for f in running]
    finally:
        server.shutdown()
        server.server_close()
    refused = [r for r in answers if r.status_code == 429]
    assert sorted(r.status_code for r in answers) == [200] * 16 + [429], answers
    assert refused[0].headers["retry-after"] == "1"
    assert error_code(refused[0]) == "too_many_in_flight"
    assert cancel.status_code == 200


def test_past_a_models_number_in_flight_nginx_refuses_it_as_the_service_would(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # zimage (the first model) also counts the bodies that name none; a model nginx has
    # no number for is not counted (the service answers for it).
    sent = (
        [{**SMALL, "model": "zimage"}] * 2 + [SMALL]
        + [{**SMALL, "model": "sdxl"}] * 3
        + [{**SMALL, "model": "other"}] * 4
    )  # fmt: skip
    try:
        with front_proxy(
            f"127.0.0.1:{server.server_port}", tmp_path, shed={"zimage": 2, "sdxl": 3}
        ) as proxy:

            def post(body):
                with proxy.client() as c:
                    return c.post("/v1/images/generations", json=body)

            with concurrent.futures.ThreadPoolExecutor(len(sent)) as pool:
                answers = list(pool.map(post, sent))
    finally:
        server.shutdown()
        server.server_close()
    codes = [r.status_code for r in answers]
    assert sorted(codes[:3]) == [200, 200, 429], codes
    assert codes[3:] == [200] * 7, codes
    refused = answers[codes.index(429)]
    assert refused.headers["retry-after"] == "1"
    assert error_code(refused) == "queue_full"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # What passed reached the upstream at the path the client asked for, with the model
    # nginx read from the body (none: no header).
    passed = [(body, r) for body, r in zip(sent, answers, strict=True) if r.status_code == 200]
    assert {r.headers["x-echo-path"] for _, r in passed} == {"/v1/images/generations"}
    assert [dict(r.json()).get("x-t2i-model", "") for _, r in passed] == [
        body.get("model", "") for body, _ in passed
    ]


class Arrivals:
    """A streamed response for events(), noting when each event's first line arrived."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.at: list[float] = []

    def iter_lines(self) -> Iterator[str]:
        for line in self.response.iter_lines():
            if line.startswith("event:"):
                self.at.append(time.monotonic())
            yield line


def test_stream_events_arrive_through_nginx_as_they_are_made(front):
    body = {"prompt": "x", "size": "512x512", "num_inference_steps": 40, "stream": True}
    with front.client() as http, http.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200, front.log()
        arrivals = Arrivals(r)
        got = events(arrivals)
    timed = [(at, name, data) for at, (name, data) in zip(arrivals.at, got, strict=True)]
    progress = [(at, data) for at, name, data in timed if name == "image_generation.progress"]
    done_at, done_name, done = timed[-1]
    assert done_name == "image_generation.completed" and len(progress) == 41  # 40 steps, decode

    # The service's own time from its first progress event to the end, against the
    # client's from that event's arrival to the completed one's: a proxy that held them
    # would deliver them together. (nginx's buffered mode alone still hands a client that
    # keeps up what it has read; with gzip on the stream too it holds every event to the
    # end, which this catches: proxy_buffering off and gzip off prevent either.)
    made = (done["timings"]["e2e"] - progress[0][1]["elapsed_ms"]) / 1000
    assert made > 0.5, f"too quick to tell ({made:.2f} s): make the request longer"
    seen = done_at - progress[0][0]
    assert seen > 0.5 * made, (seen, made)
    # And the steps arrive spread as they were made, not in a burst.
    (first_at, first), (last_at, last) = progress[0], progress[-2]
    assert last_at - first_at > 0.5 * (last["elapsed_ms"] - first["elapsed_ms"]) / 1000


def leave_while_waiting(front: FrontProxy, request_id: str) -> None:
    # Gone after 2 s, as in test_cancel: by then the request is in the step loop.
    with front.client(timeout=2.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/images/generations", json=SLOW, headers={"X-Request-Id": request_id})


def leave_mid_stream(front: FrontProxy, request_id: str) -> None:
    # Gone once the loop is under way, as in test_streaming.
    headers = {"X-Request-Id": request_id}
    with (
        front.client() as http,
        http.stream(
            "POST", "/v1/images/generations", json={**SLOW, "stream": True}, headers=headers
        ) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"step": 3' in line:
                break


# What nginx logs for a client that left: 499, or the 200 of a stream it had begun.
@pytest.mark.parametrize(
    "leave,logged", [(leave_while_waiting, 499), (leave_mid_stream, 200)], ids=["waiting", "stream"]
)
def test_a_client_that_leaves_through_nginx_stops_the_work(service, front, leave, logged):
    victim = rid("front-leaves")
    leave(front, victim)
    record = wait_for(lambda: denoiser_record(service, victim))
    assert record["stage"] == "denoise"
    assert 0 < record["steps_done"] < SLOW["num_inference_steps"]
    assert record["stop_latency_s"] <= record["max_step_s"] + 0.1
    wait_for(lambda: re.search(rf'" {logged} \d+ rid={victim} ', front.log("access.log")))


def test_a_body_over_the_services_limit_is_refused_by_nginx_alike(service, front):
    limit = service.config["applications"][0]["args"]["max_body_bytes"]
    over, at_limit = b"x" * (limit + 1), b"x" * limit
    with front.client() as http:
        refused = http.post("/v1/images/generations", content=over)
        passed = http.post("/v1/images/generations", content=at_limit)
    with service.client() as http:
        direct = http.post("/v1/images/generations", content=over)
    assert refused.status_code == 413
    assert "x-request-id" not in refused.headers  # nginx answered: Ray adds one to its own
    assert refused.headers["content-type"] == "application/json"
    assert (direct.status_code, error_code(direct)) == (413, "body_too_large")
    assert refused.json()["error"]["type"] == direct.json()["error"]["type"]
    assert error_code(refused) == error_code(direct)
    # At the limit the body reaches the service, which finds it is not JSON.
    assert passed.status_code == 400 and "x-request-id" in passed.headers, passed.text
