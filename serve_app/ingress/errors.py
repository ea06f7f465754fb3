"""Every exception a request can end with, mapped to its HTTP answer in one table, and the
one builder of the OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""

import logging
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    DoesNotFit,
    LoraError,
    PromptTooLong,
    ReplicaFailed,
    WillNotFit,
)
from serve_app.inflight import DuplicateRequestId
from serve_app.ingress.keys import Unauthorized
from serve_app.schema import InvalidRequest

logger = logging.getLogger("ray.serve")


class NotReady(Exception):
    """A model's replicas did not answer; it cannot take requests yet."""


class BodyTooLarge(InvalidRequest):
    def __init__(self, size: int, limit: int):
        super().__init__(f"the body is {size} bytes; the limit is {limit}", None, "body_too_large")


class NotFound(Exception):
    """Nothing with this id (a request to cancel, a route)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Kind:
    """How one exception type is answered."""

    status: int
    type: str  # OpenAI's error type
    outcome: str  # t2i_requests_total's label
    code: str | None = None  # when the exception carries none


# First match wins: subclasses before their bases.
ERRORS: list[tuple[type[BaseException], Kind]] = [
    (BodyTooLarge, Kind(413, "invalid_request_error", "invalid")),
    (InvalidRequest, Kind(400, "invalid_request_error", "invalid")),
    (PromptTooLong, Kind(400, "invalid_request_error", "invalid", "prompt_too_long")),
    (LoraError, Kind(422, "invalid_request_error", "invalid")),
    (NotFound, Kind(404, "invalid_request_error", "invalid", "not_found")),
    (DuplicateRequestId, Kind(409, "invalid_request_error", "invalid", "duplicate_request_id")),
    (Unauthorized, Kind(401, "invalid_request_error", "invalid")),
    (WillNotFit, Kind(413, "invalid_request_error", "rejected")),
    (Busy, Kind(429, "rate_limit_error", "rejected")),
    (BackPressureError, Kind(429, "rate_limit_error", "rejected", "queue_full")),
    (DoesNotFit, Kind(503, "service_unavailable", "oom")),
    (Cancelled, Kind(499, "cancelled", "cancelled", "cancelled")),
    (DeadlineExceeded, Kind(504, "timeout", "cancelled")),
    (NotReady, Kind(503, "service_unavailable", "rejected", "not_ready")),
    (DeploymentUnavailableError, Kind(503, "service_unavailable", "rejected", "not_ready")),
    (ReplicaFailed, Kind(503, "service_unavailable", "error")),
    # A replica that died under a call the flow did not retry (see Flow).
    (RayActorError, Kind(503, "service_unavailable", "error", "replica_failed")),
]
INTERNAL = Kind(500, "server_error", "error", "internal")


def cause(exc: BaseException) -> BaseException:
    """The replica's own exception: Ray re-raises one as RayTaskError with it as `cause`."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: BaseException, request_id: str) -> tuple[JSONResponse, str]:
    """The HTTP answer and the outcome label for an exception raised by a request."""
    exc = cause(exc)
    kind = next((k for t, k in ERRORS if isinstance(exc, t)), None)
    if kind is None:
        kind, message = INTERNAL, f"internal error; quote request id {request_id} when reporting it"
        logger.error("request %s failed", request_id, exc_info=exc)
    elif isinstance(exc, BackPressureError):
        message = "the service is at capacity; retry shortly"
    else:
        message = str(exc)
    code = getattr(exc, "code", None) or kind.code
    body = error_body(message, kind.type, getattr(exc, "param", None), code)
    headers = None
    if kind.status in (429, 503):
        headers = {"Retry-After": str(getattr(exc, "retry_after_s", 1))}
    elif kind.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=kind.status, headers=headers), kind.outcome
