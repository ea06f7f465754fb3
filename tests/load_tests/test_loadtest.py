"""How the load tests judge answers and sum them up (load_tests/traffic.py, loadtest.py):
a load test whose verdicts are wrong passes whatever the service does. No service here;
the load tests themselves run against the session's app in tests/serve/test_load.py."""

import base64
import io
import json

import pytest
from PIL import Image

from load_tests import scenarios, traffic
from load_tests.loadtest import checks, stalled_s, summarise

SMALL = traffic.Kind("small", "zimage", "256x256", 4, False, 1)
STREAMED = traffic.Kind("small-stream", "zimage", "256x256", 4, True, 1)


def png_b64(size: tuple[int, int], fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def answer(b64: str) -> bytes:
    return json.dumps({"data": [{"b64_json": b64}], "seed": 1}).encode()


def stream(*events: tuple[str, dict]) -> bytes:
    blocks = [f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n" for name, data in events]
    return "".join(blocks).encode()


def test_a_png_of_the_asked_size_is_ok_and_anything_else_is_a_wrong_image():
    assert traffic.judge(200, None, answer(png_b64((256, 256))), SMALL).outcome == "ok"
    wrong = [
        answer(png_b64((256, 128))),  # another size
        answer(png_b64((256, 256), "JPEG")),  # another format
        answer(png_b64((256, 256))[:-40]),  # cut short
        b'{"data": []}',
        b"not json",
    ]
    for body in wrong:
        assert traffic.judge(200, None, body, SMALL).outcome == "wrong_image", body[:60]


def test_a_stream_is_ok_only_if_it_ends_with_a_correct_image():
    progress = ("image_generation.progress", {"stage": "denoise", "step": 1, "total": 4})
    completed = ("image_generation.completed", {"b64_json": png_b64((256, 256))})
    error = ("error", {"error": {"code": "internal", "message": "boom"}})
    assert traffic.judge(200, None, stream(progress, completed), STREAMED).outcome == "ok"
    assert traffic.judge(200, None, stream(progress), STREAMED).outcome == "wrong_image"
    verdict = traffic.judge(200, None, stream(progress, error), STREAMED)
    assert (verdict.outcome, verdict.code) == ("stream_error", "internal")


def test_refusals_need_retry_after():
    full = b'{"error": {"code": "queue_full", "message": "m", "type": "t", "param": null}}'
    assert traffic.judge(429, "1", full, SMALL) == traffic.Verdict("refused", "queue_full")
    assert traffic.judge(503, "2", full, SMALL).outcome == "refused"
    assert traffic.judge(429, None, full, SMALL).outcome == "refused_without_retry_after"
    assert traffic.judge(504, None, full, SMALL).outcome == "deadline"
    assert traffic.judge(500, None, b"", SMALL).outcome == "server_error"


def row(status: int, outcome: str, latency_s: float = 0.05, **extra) -> dict:
    return {"t": 0.0, "kind": "small", "model": "zimage", "stream": False, "status": status,
            "latency_s": latency_s, "outcome": outcome, "code": None, "detail": None,
            "id": "x", **extra}  # fmt: skip


def test_only_deliberate_503s_pass_and_slow_refusals_miss_the_target():
    records = [row(200, "ok", 0.5), row(429, "refused", 0.02), row(503, "refused", 0.3)]
    summary = summarise(records)
    assert summary["unexpected_5xx"] == 0
    assert summary["refusals"]["n"] == 2 and summary["refusals"]["max_ms"] == 300.0
    assert summary["refusals"]["over_target"] == 1
    assert summary["status_counts"] == {"200": 1, "429": 1, "503": 1}

    for bad in (row(503, "refused_without_retry_after"), row(504, "deadline"),
                row(200, "stream_error"), row(502, "server_error")):  # fmt: skip
        assert summarise([*records, bad])["unexpected_5xx"] == 1, bad


def test_a_refusals_latency_net_of_the_clients_own_stalls_meanwhile():
    # 0.3 s on the client's clock, 0.25 s of it the client's loop stalled (its probe woke
    # 0.25 s late at 1.28): 0.05 s the service's. The same 0.3 s with no stall is over.
    stalled = {**row(429, "refused", 0.3), "t": 1.0}
    slow = {**row(429, "refused", 0.3), "t": 5.0}
    stalls = [(1.28, 0.25), (3.0, 0.5)]  # the second ends before either refusal's span
    assert stalled_s(stalled, stalls) == pytest.approx(0.25)
    assert stalled_s(slow, stalls) == 0.0
    refusals = summarise([stalled, slow], stalls)["refusals"]
    assert refusals["over_target"] == 2
    assert refusals["over_target_net_of_client_stalls"] == 1
    assert refusals["max_net_of_client_stalls_ms"] == 300.0
    assert summarise([stalled], stalls)["refusals"]["over_target_net_of_client_stalls"] == 0


def test_a_client_that_left_or_was_stopped_has_no_status_and_failed_checks_are_named():
    records = [
        row(0, "left", intent="early", left="waiting"),
        row(200, "left", intent="stream", left="stream after 3 progress events"),
        row(200, "wrong_image"),
        row(0, "unfinished"),  # stopped by locust at the end
    ]
    summary = summarise(records)
    assert summary["status_counts"] == {"200": 1}
    assert summary["unfinished_at_stop"] == 1
    assert summary["client_left"]["n"] == 2
    assert summary["client_left"]["where"] == {"stream": 1, "waiting": 1}
    summary["after"] = {"stuck": True}
    assert checks(summary) == {
        "no_5xx_but_deliberate_503": True,
        "accepted_answered_with_correct_image": False,
        "every_client_answered": True,
        "no_replica_stuck": False,
        "target_refusals_within_100ms": True,
    }


def test_the_scenarios_are_multiples_of_capacity():
    assert scenarios.plan("steady", 10, 60, 12, 32) == [scenarios.Stage(60, rate_rps=8.0)]
    burst = scenarios.plan("burst", 10, 60, 12, 32)
    assert [(s.until_s, s.rate_rps) for s in burst] == [(20, 8.0), (40, 30.0), (60, 8.0)]
    assert scenarios.plan("overload", 10, 60, 12, 32)[0].rate_rps == 100.0
    assert scenarios.plan("storm", 10, 60, 12, 32)[0].leavers == 32
    with pytest.raises(ValueError, match="stampede"):
        scenarios.plan("stampede", 10, 60, 12, 32)
