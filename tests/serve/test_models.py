"""Several models side by side and adapters per request, over real HTTP: both families,
presets, LoRA scales and isolation, routing to the replica that holds an adapter."""

import base64
import concurrent.futures
import shutil
import time
import uuid

import openai
import pytest

from serve_app.ingress.catalog import LORA_REFRESH_S
from tests.serve.conftest import SDXL_REPLICAS
from tests.serve.test_app import png

pytestmark = pytest.mark.serve

SMALL = {"size": "256x256", "num_inference_steps": 3, "seed": 5}


def image(service, body: dict) -> bytes:
    with service.client() as http:
        r = http.post("/generate", json={"prompt": "a fox", **SMALL, **body})
    assert r.status_code == 200, r.text
    return r.content


def test_models_are_listed_with_family_presets_loras_and_limits(service):
    with service.client() as http:
        data = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert list(data) == ["zimage", "sdxl"]
    sdxl = data["sdxl"]
    assert sdxl["family"] == "sdxl" and sdxl["default_preset"] == "niannian"
    assert sdxl["presets"]["niannian"] == {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 25,
        "guidance_scale": 7.0,
        "loras": [{"name": "niannian", "scale": 0.85}],  # its file is in the test folder
    }
    names = [lora["name"] for lora in sdxl["loras"]]
    assert names == ["broken", "niannian", "other-family", "tiny-kohya", "tiny-style"]
    assert all(lora["bytes"] > 0 for lora in sdxl["loras"])
    assert sdxl["limits"]["max_loras"] == 2 and data["zimage"]["limits"]["max_loras"] == 1
    assert data["zimage"]["presets"]["turbo"]["loras"] == []


def test_the_model_field_picks_the_family(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    for model in ("zimage", "sdxl"):
        result = client.images.generate(model=model, prompt="a lighthouse", size="256x320")
        assert result.model_extra["model"] == model
        assert png(base64.b64decode(result.data[0].b64_json)).size == (256, 320)
    # The same seed and settings give different pictures in the two families.
    assert image(service, {"model": "zimage"}) != image(service, {"model": "sdxl"})


def test_a_preset_brings_its_adapter_and_the_request_overrides_it(service):
    body = {"model": "sdxl", "prompt": "ink mountains", **SMALL}
    with service.client() as http:
        with_preset = http.post("/v1/images/generations", json=body).json()
        without = http.post("/v1/images/generations", json={**body, "lora": None}).json()
        other = http.post(
            "/v1/images/generations", json={**body, "lora": {"name": "tiny-kohya"}}
        ).json()
    assert with_preset["loras"] == [{"name": "niannian", "scale": 0.85}]
    assert with_preset["guidance_scale"] == 7.0  # the preset's CFG, with SMALL's steps
    assert without["loras"] == [] and other["loras"] == [{"name": "tiny-kohya", "scale": 1.0}]
    images = {r["data"][0]["b64_json"] for r in (with_preset, without, other)}
    assert len(images) == 3


@pytest.mark.parametrize("model", ["zimage", "sdxl"])
def test_scale_zero_is_the_base_image_and_a_scale_changes_it(service, model):
    base = image(service, {"model": model, "lora": None})
    style = {"model": model, "lora": {"name": "tiny-style", "scale": 0.85}}
    assert image(service, {**style, "lora": {"name": "tiny-style", "scale": 0.0}}) == base
    styled = image(service, style)
    assert styled != base
    assert image(service, style) == styled  # the same request twice, the same image


def test_concurrent_requests_with_different_adapters_each_get_their_own(service):
    """Interleaved on the same replicas, at once: each equals its result alone."""
    bodies = [
        {"model": "sdxl", "lora": None},
        {"model": "sdxl", "lora": {"name": "tiny-style", "scale": 0.85}},
        {"model": "sdxl", "lora": {"name": "tiny-style", "scale": 0.3}},
        {"model": "sdxl", "lora": {"name": "tiny-kohya", "scale": 1.2}},
        {"model": "sdxl", "lora": [{"name": "tiny-style"}, {"name": "tiny-kohya", "scale": 0.5}]},
        {"model": "zimage", "lora": {"name": "tiny-kohya", "scale": 0.85}},
        {"model": "zimage", "lora": None},
    ]
    alone = [image(service, body) for body in bodies]
    assert len(set(alone)) == len(bodies)
    with concurrent.futures.ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda b: image(service, b), bodies * 2))
    assert together == alone * 2


def test_an_unusable_adapter_leaves_the_replica_serving(service):
    with service.client() as http:
        bad = http.post("/generate", json={"prompt": "x", **SMALL, "lora": {"name": "broken"}})
        assert bad.status_code == 422
        assert "broken.safetensors" in bad.json()["error"]["message"]
        assert http.get("/readyz").json()["status"] == "ready"
    assert image(service, {"lora": {"name": "tiny-style"}})


def replica_records(service, model: str, replicas: int) -> dict[str, dict]:
    """Each Denoiser replica's own adapter record (describe() reaches a replica at random:
    ask until every one has answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"only {len(seen)} replicas answered"
        d = service.handle("Denoiser", model).describe.remote().result()
        seen[d["replica"]] = d["loras"]
    return seen


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(service, lora_dirs):
    """An adapter no replica has seen: the first request loads it on one replica, and the
    next five, routed to that replica, find it there (with random routing over two
    replicas, five in a row would land there one time in 32)."""
    name = f"route-{uuid.uuid4().hex[:8]}"
    shutil.copy(
        lora_dirs["sdxl"] / "tiny-style.safetensors", lora_dirs["sdxl"] / f"{name}.safetensors"
    )
    time.sleep(LORA_REFRESH_S + 0.5)  # the ingress may ask for the adapter listing again
    before = replica_records(service, "sdxl", SDXL_REPLICAS)
    for i in range(6):
        image(service, {"model": "sdxl", "lora": {"name": name}, "seed": i})
        if i == 0:  # the replica reports what it loaded to Serve's routers
            time.sleep(1.0)
    after = replica_records(service, "sdxl", SDXL_REPLICAS)
    assert not any(name in r["loads"] for r in before.values())
    loads = {k: r["loads"].get(name, 0) for k, r in after.items()}
    hits = {k: r["hits"].get(name, 0) for k, r in after.items()}
    assert sum(loads.values()) == 1 and sum(hits.values()) == 5, (loads, hits)
    [holder] = [k for k, n in loads.items() if n]
    assert hits[holder] == 5
    assert [k for k, r in after.items() if name in r["resident"]] == [holder]


def test_requests_of_one_model_do_not_wait_for_another_models_queue(service):
    """SDXL is busy with slow requests; a Z-Image request is served meanwhile."""
    slow = {
        "model": "sdxl",
        "prompt": "slow",
        "size": "768x768",
        "num_inference_steps": 12,
        "guidance_scale": 0.0,
        "lora": None,
    }

    def post(body):
        with service.client() as http:
            return http.post("/generate", json=body)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(post, slow) for _ in range(SDXL_REPLICAS)]
        time.sleep(1.0)
        started = time.monotonic()
        assert post({"model": "zimage", "prompt": "quick", **SMALL}).status_code == 200
        quick_s = time.monotonic() - started
        assert not all(f.done() for f in busy)  # SDXL was still drawing
        assert all(f.result().status_code == 200 for f in busy)
    assert quick_s < 5


def test_unknown_model_lists_the_served_ones(service):
    with service.client() as http:
        r = http.post("/generate", json={"prompt": "x", "model": "flux"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
    assert "available: zimage, sdxl" in r.json()["error"]["message"]


def test_openai_client_reads_our_lora_errors(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(prompt="x", size="256x256", extra_body={"lora": {"name": "nope"}})
    assert "available:" in str(err.value)
    assert err.value.body["code"] == "lora_not_found"
