"""The application over real HTTP: placement, routes, the official openai client."""

import base64
import io

import httpx
import openai
import pytest
import ray
from PIL import Image
from ray import serve

from load_tests.local_service import deployment_config
from tests.serve.conftest import NUM_GPUS

pytestmark = pytest.mark.serve


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def gpus(service, name: str) -> float:
    return deployment_config(service.config, name)["ray_actor_options"]["num_gpus"]


def test_replicas_are_placed_on_gpus_as_the_config_says(service):
    # The config's single-GPU layout for two models (a pin on deploy/serve_config.yaml):
    # each model's encoder on an eighth of the card, its denoiser on three eighths.
    reserved = 0.0
    for model in ("zimage", "sdxl"):
        enc = service.handle("PromptEncoder", model).describe.remote().result()
        den = service.handle("Denoiser", model).describe.remote().result()
        assert (enc["model"], den["model"]) == (model, model)
        assert len(enc["gpu_ids"]) == len(den["gpu_ids"]) == 1  # a share of one card each
        enc_gpus, den_gpus = (
            gpus(service, f"PromptEncoder-{model}"),
            gpus(service, f"Denoiser-{model}"),
        )
        assert (enc_gpus, den_gpus) == (0.125, 0.375)
        replicas = deployment_config(service.config, f"Denoiser-{model}").get("num_replicas", 1)
        reserved += enc_gpus + replicas * den_gpus
        assert den["device"] == "cpu"  # no CUDA here: the engine runs on the CPU
    assert "GPU" not in deployment_config(service.config, "Ingress")["ray_actor_options"]
    # The session's other applications hold their own shares: the strict one's fixed
    # replicas, the idle one's running Denoisers (none unless a request woke it).
    for app in service.config["applications"][1:]:
        states = serve.status().applications[app["name"]].deployments
        for d in app["deployments"]:
            running = states[d["name"]].replica_states.get("RUNNING", 0)
            replicas = d.get("num_replicas", 1) if "autoscaling_config" not in d else running
            reserved += replicas * d["ray_actor_options"].get("num_gpus", 0)
    # ... is what Ray reserved: the rest of the logical GPUs is free.
    assert ray.available_resources().get("GPU", 0) == pytest.approx(NUM_GPUS - reserved)


def test_openai_client_gets_a_png_of_the_requested_size(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="a red fox in the snow", size="320x256", n=2, response_format="b64_json"
    )
    assert len(result.data) == 2
    for item in result.data:
        image = png(base64.b64decode(item.b64_json))
        assert (image.format, image.size, image.mode) == ("PNG", (320, 256), "RGB")
    extra = result.model_extra
    assert isinstance(extra["seed"], int)
    # "adapters": putting the request's adapters in place (none here), for a model
    # that serves adapters, as the default does.
    stages = {"encode", "queue", "adapters", "denoise", "decode", "encode_image", "e2e"}
    assert set(extra["timings"]) == stages | {"encode_transfer", "result_transfer"}
    assert all(extra["timings"][k] >= 0 for k in ("encode_transfer", "result_transfer"))
    assert set(extra["vram"]) == {"encode", "adapters", "denoise", "decode"}
    assert all(v == 0 for v in extra["vram"].values())  # CPU


def test_images_larger_than_a_grpc_message_cross_between_replicas(service):
    """1536x1536 pixels are 7 MB, past gRPC's default 4 MB message limit, which failed
    1280x1280 on an H200 run when the pixels went over gRPC (they now go through Ray's
    object store; the other calls between replicas are gRPC)."""
    body = {"prompt": "wide", "size": "1536x1536", "num_inference_steps": 1}
    with service.client() as http:
        r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert png(r.content).size == (1536, 1536)


def test_openai_client_lists_the_models(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    zimage, sdxl = client.models.list().data
    assert (zimage.id, sdxl.id) == ("zimage", "sdxl")  # the config's order; first is default
    assert zimage.model_extra["family"] == "zimage"
    assert zimage.model_extra["presets"]["turbo"]["num_inference_steps"] == 9
    assert zimage.model_extra["limits"]["max_prompt_tokens"] == 512
    assert sdxl.model_extra["family"] == "sdxl"
    assert sdxl.model_extra["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert sdxl.model_extra["limits"]["max_prompt_tokens"] == 77


def test_generate_answers_png_bytes(service):
    with service.client() as http:
        r = http.post("/generate", json={"prompt": "a lighthouse", "size": "256x384", "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png(r.content).size == (256, 384)
    assert r.headers["x-seed"] == "3"
    assert "denoise;dur=" in r.headers["server-timing"]


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_output_format(service, fmt):
    with service.client() as http:
        r = http.post(
            "/generate", json={"prompt": "a lighthouse", "size": "256x256", "output_format": fmt}
        )
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert png(r.content).format == fmt.upper()


def test_same_seed_same_image_and_other_seed_another(service):
    body = {"prompt": "a bowl of ramen", "size": "256x256", "num_inference_steps": 4}
    with service.client() as http:
        a = http.post("/generate", json={**body, "seed": 7}).content
        b = http.post("/generate", json={**body, "seed": 7}).content
        c = http.post("/generate", json={**body, "seed": 8}).content
    assert a == b and a != c


def test_every_response_carries_a_request_id(service):
    with service.client() as http:
        mine = http.get("/healthz", headers={"X-Request-Id": "my-id-1"})
        theirs = http.post("/v1/images/generations", json={"prompt": ""})
    assert mine.headers["x-request-id"] == "my-id-1"
    assert len(theirs.headers["x-request-id"]) >= 16


def test_json_body_reports_seed_and_settings(service):
    with service.client() as http:
        r = http.post(
            "/v1/images/generations",
            json={"prompt": "a cat", "size": "256x256", "seed": 99, "guidance_scale": 2.5},
            headers={"X-Request-Id": "json-body-1"},
        )
    body = r.json()
    assert r.status_code == 200
    assert (body["seed"], body["id"], body["size"]) == (99, "json-body-1", "256x256")
    assert (body["num_inference_steps"], body["guidance_scale"]) == (9, 2.5)
    assert body["timings"]["e2e"] >= body["timings"]["denoise"] > 0


def test_health_and_readiness(service):
    with service.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
    body = ready.json()
    assert ready.status_code == 200 and body["status"] == "ready"
    assert body["models"]["zimage"]["denoiser"]["family"] == "zimage"
    assert body["models"]["sdxl"]["denoiser"]["family"] == "sdxl"


def test_web_page_is_served(service):
    r = httpx.get(f"{service.url}/")
    assert r.status_code == 200 and "/v1/images/generations" in r.text
