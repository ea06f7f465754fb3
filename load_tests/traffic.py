"""What the load tests send and how each answer is judged.

No locust here: the runner (a Ray driver or a pytest process) imports this module too,
and locust must never be imported there (it patches the standard library with gevent on
import). The locustfile draws its requests from `MIX` and judges them with `judge`.
"""

import base64
import binascii
import io
import json
import random
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

PATH = "/v1/images/generations"
PROMPT = "a lighthouse on a cliff in a storm, oil painting"

# Statuses of the service's contract (README.md): what each one means to a client.
INVALID = (400, 413, 422)
REFUSED = (429, 503)
DEADLINE = 504
LEFT = 499


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix.

    Args:
        name: its name in locust's statistics and in the report.
        model: the served model's id.
        size: "WxH".
        steps: num_inference_steps.
        stream: "stream": true (server-sent events).
        weight: its share of the mix, relative to the others.
    """

    name: str
    model: str
    size: str
    steps: int
    stream: bool
    weight: int

    def body(self) -> dict:
        body = {
            "model": self.model,
            "prompt": PROMPT,
            "size": self.size,
            "num_inference_steps": self.steps,
            "seed": random.randrange(2**31),
        }
        if self.stream:
            body.update(stream=True, partial_images=1)
        return body

    @property
    def width_height(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)


# Mostly small images of both families, a share of them streamed, a few larger ones.
MIX = (
    Kind("zimage-256", "zimage", "256x256", 4, False, 6),
    Kind("sdxl-256", "sdxl", "256x256", 4, False, 3),
    Kind("zimage-256-stream", "zimage", "256x256", 4, True, 2),
    Kind("sdxl-256-stream", "sdxl", "256x256", 4, True, 1),
    Kind("zimage-512", "zimage", "512x512", 4, False, 1),
)
# The disconnect storm's requests: more steps, so that a client has a denoising loop to
# leave in the middle of.
LEAVING = (
    Kind("zimage-256-leave", "zimage", "256x256", 12, False, 2),
    Kind("sdxl-256-leave", "sdxl", "256x256", 12, False, 1),
    Kind("zimage-256-stream-leave", "zimage", "256x256", 12, True, 2),
    Kind("sdxl-256-stream-leave", "sdxl", "256x256", 12, True, 1),
)


def draw(kinds: tuple[Kind, ...]) -> Kind:
    return random.choices(kinds, weights=[k.weight for k in kinds])[0]


@dataclass(frozen=True)
class Verdict:
    """How one answer is judged.

    outcome: "ok" (200 and a correct image), "wrong_image" (200 and anything else),
    "stream_error" (200 and an `error` event), "refused" (429/503 with Retry-After),
    "refused_without_retry_after", "invalid" (400/413/422), "deadline" (504),
    "left_499" (499 reached a client), "server_error" (any other 5xx), "unexpected"
    (any other status), "no_answer" (the connection failed or timed out).
    code: the OpenAI error body's `code`, when there is one.
    detail: what was wrong, for the failures.
    """

    outcome: str
    code: str | None = None
    detail: str | None = None


def check_image(b64: str | bytes, size: tuple[int, int]) -> str | None:
    """None if `b64` is a PNG of `size` (width, height) that decodes; else what is wrong."""
    try:
        data = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format != "PNG":
                return f"a {image.format} image, not PNG"
            if image.size != size:
                return f"an image of {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:
        return f"the image does not decode: {exc}"
    return None


def sse_events(body: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event of a complete stream."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def judge(status: int, retry_after: str | None, body: bytes, kind: Kind) -> Verdict:
    """The verdict on one complete answer to a request of `kind`.

    Args:
        status: the HTTP status (0: no answer).
        retry_after: the Retry-After header, if any.
        body: the whole body (the whole event stream for a streamed request).
    """
    if status == 200:
        return _judge_image(body, kind)
    code = error_code(body)
    if status in REFUSED:
        if retry_after is None:
            return Verdict("refused_without_retry_after", code, f"{status} without Retry-After")
        return Verdict("refused", code)
    if status in INVALID:
        return Verdict("invalid", code, body[:300].decode(errors="replace"))
    if status == DEADLINE:
        return Verdict("deadline", code)
    if status == LEFT:
        return Verdict("left_499", code)
    if status >= 500:
        return Verdict("server_error", code, body[:300].decode(errors="replace"))
    return Verdict("unexpected", code, f"status {status}")


def _judge_image(body: bytes, kind: Kind) -> Verdict:
    try:
        if kind.stream:
            events = sse_events(body.decode())
            name, data = events[-1] if events else ("none", {})
            if name == "error":
                return Verdict("stream_error", data.get("error", {}).get("code"))
            if name != "image_generation.completed":
                return Verdict("wrong_image", None, f"the stream ended with {name!r}")
            b64 = data["b64_json"]
        else:
            b64 = json.loads(body)["data"][0]["b64_json"]
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        return Verdict("wrong_image", None, f"the answer does not parse: {exc!r}")
    wrong = check_image(b64, kind.width_height)
    return Verdict("wrong_image", None, wrong) if wrong else Verdict("ok")
