"""The HTTP request schema and its validation, in one place.

Field names are the OpenAI Images API's (`prompt, n, size, response_format,
output_format, output_compression, stream, partial_images, user`) plus the diffusers
names for what OpenAI has none of (`negative_prompt, num_inference_steps,
guidance_scale, seed`) and ours (`lora, preset`). Types are strict: "2" is not an int.
"""

import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from serve_app.errors import BadLoraName
from serve_app.messages import GenerationParams, LoraChoice

_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# `size` as the OpenAPI document states it. Stated, not validated: parse_size refuses a
# bad size with a message that names the accepted form, pydantic's would not.
SizeText = Annotated[
    str, WithJsonSchema({"type": "string", "pattern": r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"})
]
MAX_SEED = 2**63 - 1
MAX_IMAGES = 4
MAX_STEPS = 100
MAX_LORAS = 3  # adapters one request may name (a model may allow fewer: its lora_slots)
MAX_LORA_NAME = 128


class InvalidRequest(ValueError):
    """A request that is well-formed HTTP but asks for something we refuse.

    Args:
        message: what was wrong and what would be accepted.
        param: the offending field, if one.
        code: a stable machine-readable reason.
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message, param, code)
        self.message, self.param, self.code = message, param, code

    def __str__(self) -> str:
        return self.message


class LoraRef(BaseModel):
    """One adapter: a file name of the model's LoRA folder (without ".safetensors")."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, description="An adapter listed under the model's `loras`.")
    scale: float = Field(1.0, ge=0.0, le=2.0, description="0 leaves the image as without it.")


def check_lora_name(name: str) -> None:
    """Refuse a name that is not a plain file name (BadLoraName, HTTP 422), before any
    file is looked at: no path separator, no "..", no NUL or other control character,
    not hidden, at most 128 characters."""
    reason = None
    if len(name) > MAX_LORA_NAME:
        reason = f"is {len(name)} characters long; the limit is {MAX_LORA_NAME}"
    elif "/" in name or "\\" in name:
        reason = "holds a path separator"
    elif ".." in name:
        reason = "holds '..'"
    elif not name.isprintable():
        reason = "holds a control character"
    elif name.startswith(".") or not name.strip():
        reason = "is not a visible file name"
    if reason is not None:
        raise BadLoraName(name, reason)


class ImageRequest(BaseModel):
    """Body of POST /v1/images/generations and POST /generate."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        max_length=20_000,
        description=(
            "What to draw: not blank, at most the model's `max_prompt_tokens` tokens "
            "(`limits` in GET /v1/models)."
        ),
        # Stated, not validated: _not_blank refuses a blank prompt in its own words. The
        # characters str.strip() removes are spelled out: ECMA's \s (the document's regex
        # dialect) and Python's differ.
        json_schema_extra={
            "pattern": r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
        },
    )
    model: str | None = Field(None, description="A model id from GET /v1/models.")
    n: int = Field(
        1,
        ge=1,
        le=MAX_IMAGES,
        description="Images to draw from this prompt; 1 with stream and on POST /generate.",
    )
    size: SizeText | None = Field(
        None,
        description=(
            '"WIDTHxHEIGHT" in pixels, e.g. "1024x1024": each side a multiple of the '
            "model's `side_multiple` from its `min_side` to its `max_side` (operator "
            'settings, under `limits` in GET /v1/models). "auto" or null: the preset\'s size.'
        ),
    )
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool = Field(
        False,
        description=(
            "Server-sent events: progress each step, previews, the image (POST "
            "/v1/images/generations only)."
        ),
    )
    partial_images: int = Field(
        0, ge=0, le=3, description="Previews streamed before the image (with stream)."
    )
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    negative_prompt: str | None = Field(
        None,
        max_length=20_000,
        description="At most the model's `max_prompt_tokens` tokens, like the prompt.",
    )
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    lora: list[LoraRef] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=(
            "Style adapters: one {name, scale} object or a list of up to 3, each named once "
            "(at most the model's `max_loras`, under `limits` in GET /v1/models); replaces "
            "the preset's. null or [] for none."
        ),
    )
    preset: str | None = None

    @field_validator("lora", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, dict) else v

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v


@dataclass(frozen=True)
class Limits:
    """Operator-set bounds on a request (deploy/serve_config.yaml `args`)."""

    min_side: int = 256
    max_side: int = 2048
    side_multiple: int = 16


def parse_request(data: object) -> ImageRequest:
    """Validate a decoded JSON body; raises InvalidRequest naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, data) from None


def _from_validation_error(exc: ValidationError, data: dict) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    loc = list(err["loc"])
    if loc[:2] == ["lora", 0] and isinstance(data.get("lora"), dict):
        del loc[1]  # the request sent one object, not a list
    param = ".".join(str(p) for p in loc) or None
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(ImageRequest.model_fields)
        return InvalidRequest(
            f"unknown field '{param}'; accepted fields: {allowed}", param, "unknown_parameter"
        )
    if kind == "missing":
        return InvalidRequest(f"'{param}' is required", param, "missing_parameter")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "an object"
    message = err["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"'{param}': {message} (got {shown})", param, "invalid_value")


def requested_loras(req: ImageRequest, preset: dict) -> tuple[LoraChoice, ...]:
    """The request's adapters: its own `lora` field if it has one (null or [] for none),
    else the preset's. Names are checked before anything else sees them."""
    if "lora" in req.model_fields_set:
        choices = [LoraChoice(ref.name, ref.scale) for ref in req.lora or []]
    else:
        choices = [LoraChoice(c["name"], c["scale"]) for c in preset.get("loras", [])]
    for choice in choices:
        check_lora_name(choice.name)
    names = [c.name for c in choices]
    if len(set(names)) < len(names):
        raise InvalidRequest("a LoRA is named twice; name each once, with its scale", "lora")
    return tuple(choices)


def resolve(
    req: ImageRequest,
    presets: dict[str, dict],
    default_preset: str,
    limits: Limits,
) -> GenerationParams:
    """Apply the preset, check the size against `limits`, pick a seed if none was given."""
    name = req.preset or default_preset
    if name not in presets:
        raise InvalidRequest(
            f"unknown preset '{name}'; available: {', '.join(sorted(presets))}", "preset"
        )
    preset = presets[name]
    width, height = preset["width"], preset["height"]
    if req.size is not None and req.size != "auto":
        width, height = parse_size(req.size, limits)
    return GenerationParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=req.num_inference_steps or preset["num_inference_steps"],
        guidance_scale=(
            preset["guidance_scale"] if req.guidance_scale is None else req.guidance_scale
        ),
        seed=secrets.randbelow(2**53) if req.seed is None else req.seed,
        num_images=req.n,
        loras=requested_loras(req, preset),
        partial_images=req.partial_images if req.stream else 0,
    )


def split_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a "WIDTHxHEIGHT" string; None if it is not one."""
    match = _SIZE.match(size)
    return (int(match[1]), int(match[2])) if match else None


def parse_size(size: str, limits: Limits) -> tuple[int, int]:
    accepted = (
        f"each side a multiple of {limits.side_multiple} from {limits.min_side} to "
        f"{limits.max_side}, e.g. '1024x1024' or '1280x768'"
    )
    parsed = split_size(size)
    if parsed is None:
        raise InvalidRequest(f"size '{size}' is not 'WIDTHxHEIGHT'; use {accepted}", "size")
    width, height = parsed
    for side_name, side in (("width", width), ("height", height)):
        if side % limits.side_multiple or not limits.min_side <= side <= limits.max_side:
            raise InvalidRequest(
                f"size '{size}': {side_name} {side} is out of range; {accepted}", "size"
            )
    return width, height
