"""Every validation rule over real HTTP: an OpenAI-shaped 4xx that says what was wrong."""

import json

import pytest

pytestmark = pytest.mark.serve

OK = {"prompt": "a cat", "size": "256x256"}
LONG = "word " * 600

CASES = [
    # (name, body, status, param, message fragment)
    ("size not WxH", {**OK, "size": "256"}, 400, "size", "not 'WIDTHxHEIGHT'"),
    ("size with junk", {**OK, "size": "256x256px"}, 400, "size", "not 'WIDTHxHEIGHT'"),
    ("size not multiple of 16", {**OK, "size": "1000x1024"}, 400, "size", "multiple of 16"),
    ("size too small", {**OK, "size": "128x256"}, 400, "size", "from 256 to 2048"),
    ("size too large", {**OK, "size": "256x4096"}, 400, "size", "height 4096"),
    ("size of wrong type", {**OK, "size": 256}, 400, "size", "valid string"),
    (
        "steps zero",
        {**OK, "num_inference_steps": 0},
        400,
        "num_inference_steps",
        "greater than or equal to 1",
    ),
    (
        "steps too many",
        {**OK, "num_inference_steps": 101},
        400,
        "num_inference_steps",
        "less than or equal to 100",
    ),
    ("steps float", {**OK, "num_inference_steps": 2.5}, 400, "num_inference_steps", "integer"),
    (
        "guidance negative",
        {**OK, "guidance_scale": -1},
        400,
        "guidance_scale",
        "greater than or equal to 0",
    ),
    (
        "guidance too high",
        {**OK, "guidance_scale": 20.5},
        400,
        "guidance_scale",
        "less than or equal to 20",
    ),
    ("guidance string", {**OK, "guidance_scale": "7"}, 400, "guidance_scale", "valid number"),
    ("n zero", {**OK, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("n five", {**OK, "n": 5}, 400, "n", "less than or equal to 4"),
    ("n string", {**OK, "n": "2"}, 400, "n", "valid integer"),
    ("n bool", {**OK, "n": True}, 400, "n", "valid integer"),
    ("empty prompt", {**OK, "prompt": ""}, 400, "prompt", "must not be empty"),
    ("blank prompt", {**OK, "prompt": "  \n "}, 400, "prompt", "must not be empty"),
    ("missing prompt", {"size": "256x256"}, 400, "prompt", "required"),
    ("prompt not a string", {**OK, "prompt": ["a", "b"]}, 400, "prompt", "valid string"),
    ("prompt too long", {**OK, "prompt": LONG}, 400, "prompt", "tokens long"),
    (
        "negative prompt too long",
        {**OK, "negative_prompt": LONG, "guidance_scale": 3.0},
        400,
        "negative_prompt",
        "at most 512",
    ),
    ("unknown field", {**OK, "quality": "hd"}, 400, "quality", "unknown field 'quality'"),
    ("seed negative", {**OK, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("seed too big", {**OK, "seed": 2**64}, 400, "seed", "less than or equal to"),
    ("response_format url", {**OK, "response_format": "url"}, 400, "response_format", "b64_json"),
    ("output_format gif", {**OK, "output_format": "gif"}, 400, "output_format", "png"),
    (
        "compression 101",
        {**OK, "output_compression": 101},
        400,
        "output_compression",
        "less than or equal to 100",
    ),
    ("unknown model", {**OK, "model": "dall-e-3"}, 400, "model", "available: zimage, sdxl"),
    ("unknown preset", {**OK, "preset": "nope"}, 400, "preset", "available: turbo"),
    (
        "unknown lora",
        {**OK, "lora": {"name": "ghibli"}},
        422,
        "lora.name",
        "LoRA 'ghibli' is not available for this model; available: broken, other-family, "
        "tiny-kohya, tiny-style",
    ),
    ("lora dots", {**OK, "lora": {"name": ".."}}, 422, "lora.name", "holds '..'"),
    ("lora separator", {**OK, "lora": {"name": "a/b"}}, 422, "lora.name", "path separator"),
    ("lora nul", {**OK, "lora": {"name": "a\u0000b"}}, 422, "lora.name", "control character"),
    ("lora long", {**OK, "lora": {"name": "x" * 129}}, 422, "lora.name", "the limit is 128"),
    ("lora hidden", {**OK, "lora": {"name": ".tiny-style"}}, 422, "lora.name", "not a visible"),
    (
        "lora corrupt",
        {**OK, "lora": {"name": "broken"}},
        422,
        "lora.name",
        "LoRA file 'broken.safetensors' cannot be used: it is not a readable LoRA file",
    ),
    (
        "lora of another family",
        {**OK, "lora": {"name": "other-family"}},
        422,
        "lora.name",
        "'other-family.safetensors' cannot be used",
    ),
    (
        "lora too many for the model",
        {**OK, "lora": [{"name": "tiny-style"}, {"name": "tiny-kohya"}]},
        400,
        "lora",
        "combines at most 1",
    ),
    ("lora four", {**OK, "lora": [{"name": "tiny-style"}] * 4}, 400, "lora", "at most 3 items"),
    (
        "lora twice",
        {**OK, "model": "sdxl", "lora": [{"name": "tiny-style"}, {"name": "tiny-style"}]},
        400,
        "lora",
        "named twice",
    ),
    ("lora not an object", {**OK, "lora": "tiny-style"}, 400, "lora", "valid list"),
    (
        "lora scale",
        {**OK, "lora": {"name": "tiny-style", "scale": 9}},
        400,
        "lora.scale",
        "less than or equal to 2",
    ),
    ("stream of two", {**OK, "stream": True, "n": 2}, 400, "n", "draws one image"),
    ("partial images 4", {**OK, "stream": True, "partial_images": 4}, 400, "partial_images", "3"),
]


@pytest.mark.parametrize("name,body,status,param,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_field(service, name, body, status, param, fragment):
    with service.client() as http:
        r = http.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"], error["message"]
    assert error["type"] == "invalid_request_error" and error["code"]


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"a cat"', "must be a JSON object"),
    ],
)
def test_malformed_body(service, raw, fragment):
    with service.client() as http:
        r = http.post(
            "/v1/images/generations", content=raw, headers={"content-type": "application/json"}
        )
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]


def test_body_too_large(service):
    body = json.dumps({"prompt": "x" * 1_200_000})
    with service.client() as http:
        r = http.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit is 1000000" in r.json()["error"]["message"]


def test_generate_refuses_several_images(service):
    with service.client() as http:
        r = http.post("/generate", json={**OK, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_bad_request_id(service):
    with service.client() as http:
        r = http.post("/generate", json=OK, headers={"X-Request-Id": "x" * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_unknown_route_and_method(service):
    with service.client() as http:
        assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert http.get("/v1/images/generations").status_code == 405


def test_service_still_works_after_bad_input(service):
    with service.client() as http:
        assert http.post("/generate", json={**OK, "prompt": " "}).status_code == 400
        assert http.post("/generate", json=OK).status_code == 200
