"""`"stream": true` over real HTTP: OpenAI's image-streaming events, one progress event a
step, previews as asked, the completed image equal to the plain answer's, the official
client's streaming call, a client that leaves mid-stream, refusals as plain JSON."""

import base64
import json
import uuid

import httpx
import openai
import pytest

from tests.serve.conftest import SLOW, denoiser_record, leave_stream_at, wait_for
from tests.serve.test_app import png

pytestmark = pytest.mark.serve

BODY = {"prompt": "a fox in the snow", "size": "256x256", "num_inference_steps": 6, "seed": 3}


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of a server-sent event stream, in order."""
    out, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            out.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return out


def stream(service, body: dict, request_id: str | None = None) -> tuple[httpx.Response, list]:
    headers = {"X-Request-Id": request_id} if request_id else {}
    with (
        service.client() as http,
        http.stream(
            "POST", "/v1/images/generations", json={**body, "stream": True}, headers=headers
        ) as r,
    ):
        return r, events(r) if r.status_code == 200 else json.loads(r.read())


@pytest.mark.parametrize("model", ["zimage", "sdxl"])
def test_events_in_order_with_one_progress_event_a_step(service, model):
    body = {**BODY, "model": model, "partial_images": 2, "lora": None}
    r, got = stream(service, body)
    assert r.status_code == 200, got
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    kinds = [name for name, _ in got]
    assert all(name == data["type"] for name, data in got)
    steps = [d for n, d in got if n == "image_generation.progress" and d["stage"] == "denoise"]
    assert [d["step"] for d in steps] == list(range(1, 7))  # exactly one a step, in order
    assert all(d["total"] == 6 for d in steps)
    elapsed = [d["elapsed_ms"] for n, d in got if n == "image_generation.progress"]
    assert elapsed == sorted(elapsed)
    partials = [d for n, d in got if n == "image_generation.partial_image"]
    assert [d["partial_image_index"] for d in partials] == [0, 1]
    for d in partials:
        assert png(base64.b64decode(d["b64_json"])).size == (256, 256)
        assert (d["size"], d["output_format"]) == ("256x256", "png")
    assert kinds[-1] == "image_generation.completed" and kinds.count(kinds[-1]) == 1
    # Previews come between the steps they show: after step 2 and step 4 of 6.
    assert kinds.index("image_generation.partial_image") > kinds.index("image_generation.progress")
    decode = [d for n, d in got if n == "image_generation.progress" and d["stage"] == "decode"]
    assert len(decode) == 1
    done = got[-1][1]
    assert done["seed"] == 3 and done["model"] == model and done["timings"]["e2e"] > 0
    # The completed image is the plain answer's, to the byte.
    with service.client() as http:
        plain = http.post("/v1/images/generations", json={**body, "partial_images": 0}).json()
    assert done["b64_json"] == plain["data"][0]["b64_json"]


def test_no_partial_images_unless_asked(service):
    r, got = stream(service, BODY)
    assert r.status_code == 200
    assert not [n for n, _ in got if n == "image_generation.partial_image"]


def test_the_openai_client_reads_the_stream(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    seen = list(
        client.images.generate(
            prompt="a lighthouse",
            size="256x256",
            stream=True,
            partial_images=1,
            extra_body={"num_inference_steps": 4, "seed": 1},
        )
    )
    kinds = [e.type for e in seen]
    assert kinds.count("image_generation.partial_image") == 1
    assert kinds[-1] == "image_generation.completed"
    assert png(base64.b64decode(seen[-1].b64_json)).size == (256, 256)
    assert seen[-1].model_extra["seed"] == 1


def test_a_client_that_leaves_mid_stream_stops_the_loop_within_one_step(service):
    victim = f"stream-leaves-{uuid.uuid4().hex[:8]}"
    leave_stream_at(service, SLOW, victim, 3)  # once the loop is under way
    record = wait_for(lambda: denoiser_record(service, victim))
    assert record["stage"] == "denoise"
    assert 3 <= record["steps_done"] < SLOW["num_inference_steps"]
    assert record["stop_latency_s"] <= record["max_step_s"] + 0.1


@pytest.mark.parametrize(
    "body,status",
    [
        ({"size": "250x256"}, 400),  # refused at the ingress
        ({"lora": {"name": "nope"}}, 422),  # refused at the ingress, from the model's list
        ({"lora": {"name": "broken"}}, 422),  # refused by the replica, after encoding
        ({"n": 2}, 400),
    ],
)
def test_a_refused_stream_gets_the_same_json_error_as_without_stream(service, body, status):
    with service.client() as http:
        plain = http.post("/v1/images/generations", json={**BODY, **body})
    r, got = stream(service, {**BODY, **body})
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    if body.get("n") != 2:  # n=2 is refused only when streaming
        assert plain.status_code == status and got == plain.json()
    assert got["error"]["message"]
