"""The served OpenAPI document: every $ref resolves, it states the limits the API enforces,
and bodies generated from it by schemathesis are answered as it says (no 5xx)."""

import copy
import re
import sys
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from serve_app.schema import MAX_IMAGES, MAX_LORAS, MAX_SEED, MAX_STEPS

pytestmark = pytest.mark.serve

GENERATION_PATHS = ["/v1/images/generations", "/generate"]
# Bodies per path and mode: positive ones are drawn (~0.3 s each here), negative ones
# refused at once.
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 50}
# The adapters conftest.py gives both models that load (the folders also hold unusable ones).
LORAS = ["tiny-kohya", "tiny-style"]


@pytest.fixture(scope="module")
def document(service) -> dict:
    with service.client() as http:
        r = http.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def resolve(document: dict, ref: str):
    """The value a local $ref ("#/a/b") points at; KeyError if it points at nothing."""
    assert ref.startswith("#/"), f"{ref} is not a reference within the document"
    value = document
    for part in ref[2:].split("/"):
        value = value[part.replace("~1", "/").replace("~0", "~")]
    return value


def refs(value) -> list[str]:
    """Every $ref under a JSON value."""
    if isinstance(value, dict):
        own = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return own + [ref for v in value.values() for ref in refs(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in refs(v)]
    return []


def body_fields(document: dict, path: str) -> dict:
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return resolve(document, body["schema"]["$ref"])["properties"]


def branch(field: dict, type_: str) -> dict:
    """The schema of a field for its type: the field's own, or its anyOf branch of it."""
    return next(s for s in field.get("anyOf", [field]) if s.get("type") == type_)


def test_every_ref_resolves(document):
    found = refs(document)
    dangling = []
    for ref in set(found):
        try:
            resolve(document, ref)
        except (KeyError, TypeError):
            dangling.append(ref)
    assert not dangling, f"$refs that point at nothing: {dangling}"
    assert "#/components/schemas/LoraRef" in found  # the body's nested model, reached


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_states_the_limits(document, path):
    fields = body_fields(document, path)
    size = branch(fields["size"], "string")["pattern"]
    # The pattern's syntax means the same in ECMA-262 and Python.
    for good in ("1024x1024", "1280x768", "auto"):
        assert re.search(size, good), good
    for bad in ("256", "256x256px", "x256", "1024X1024", "auto256", ""):
        assert not re.search(size, bad), bad
    description = fields["size"]["description"]
    assert all(word in description for word in ("side_multiple", "min_side", "max_side"))
    # A prompt must hold a character that str.strip() keeps (schema.py refuses it else).
    prompt = fields["prompt"]["pattern"]
    for c in map(chr, range(sys.maxunicode + 1)):
        assert bool(re.search(prompt, c)) != c.isspace(), hex(ord(c))
    ranges = {
        "n": (1, MAX_IMAGES, "integer"),
        "num_inference_steps": (1, MAX_STEPS, "integer"),
        "guidance_scale": (0, 20, "number"),
        "partial_images": (0, 3, "integer"),
        "output_compression": (0, 100, "integer"),
        "seed": (0, MAX_SEED, "integer"),
    }
    for name, (low, high, type_) in ranges.items():
        field = branch(fields[name], type_)
        assert (field["minimum"], field["maximum"]) == (low, high), name
    assert branch(fields["lora"], "array")["maxItems"] == MAX_LORAS
    scale = resolve(document, "#/components/schemas/LoraRef")["properties"]["scale"]
    assert (scale["minimum"], scale["maximum"]) == (0, 2)


def cheap(document: dict, models: list[str]) -> dict:
    """The document with the body's costly and operator-set fields narrowed, for each
    generated body to be drawn in well under a second: the tiny model on the CPU takes
    ~0.1-0.3 s a step at 256x256 and seconds at 1024x1024 (the presets' size, which
    "auto" and null pick); stream answers events, n draws several. Model, preset and
    adapter names are the operator's: random ones are refused (400/422). Every other
    field is generated as the served document states it."""
    document = copy.deepcopy(document)
    body = document["components"]["schemas"]["ImageRequest"]
    body["properties"].update(
        model={"enum": [None, *models]},
        size={"const": "256x256"},
        n={"const": 1},
        num_inference_steps={"type": "integer", "minimum": 1, "maximum": 2},
        stream={"const": False},
        preset={"const": None},
        lora={
            "anyOf": [
                {"type": "array", "maxItems": 1, "items": {"$ref": "#/components/schemas/LoraRef"}},
                {"type": "null"},
            ]
        },
    )
    body["required"] += ["size", "num_inference_steps"]  # left out, the preset's are used
    document["components"]["schemas"]["LoraRef"]["properties"]["name"] = {"enum": LORAS}
    return document


def integers(document: dict, path: str) -> set[str]:
    return {
        name
        for name, field in body_fields(document, path).items()
        if any(s.get("type") == "integer" for s in field.get("anyOf", [field]))
    }


def whole_numbers(case, fields: set[str]):
    """The case with integral floats in integer `fields` sent as integers: JSON Schema's
    "integer" admits 2.0, which the API's strict types (schema.py) refuse with a 400."""
    if isinstance(case.body, dict):
        case.body = {
            k: int(v) if k in fields and isinstance(v, float) and v.is_integer() else v
            for k, v in case.body.items()
        }
    return case


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_generated_bodies(service, document, path, mode):
    """Positive: bodies the (narrowed) document allows; none is answered 5xx and nearly
    all are drawn. Negative: bodies the served document forbids; each is refused, 4xx."""
    if mode.is_positive:
        with service.client() as http:
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        operation = schemathesis.openapi.from_dict(cheap(document, models))[path]["POST"]
        ints = integers(document, path)
        cases = operation.as_strategy(mode).map(lambda case: whole_numbers(case, ints))
    else:
        cases = schemathesis.openapi.from_dict(document)[path]["POST"].as_strategy(mode)
    answers: Counter[int] = Counter()

    # derandomize: the same bodies each run, so that CI is not red by chance. No shrinking:
    # it would resend hundreds of bodies after a failure; the first is reported as it is.
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=cases)
    def send(case):
        response = case.call(base_url=service.url, timeout=60)
        answers[response.status_code] += 1
        context = f"{case.body!r} -> {response.status_code} {response.content[:300]!r}"
        assert response.status_code < 500, context
        if not mode.is_positive:
            assert 400 <= response.status_code < 500, context

    send()
    sent = sum(answers.values())
    assert sent >= EXAMPLES[mode] // 2, answers  # hypothesis did send bodies
    if mode.is_positive:
        assert answers[200] >= 0.9 * sent, answers
