"""What no client from outside may ask for: Ray Serve's per-request switches.

Ray's HTTP proxy reads two headers before our code runs (ray/serve/_private/proxy.py):
`x-request-disconnect-disabled: ?1` keeps a request running after its client has left,
and `x-request-timeout-seconds` replaces the configured request timeout (a value <= 0
removes it). They are for trusted callers inside the cluster. A request carrying either
is answered 400 here, at once, before any work starts; so a client that sends one and
leaves costs nothing. The front proxy (deploy/nginx/) strips them before they get here.
"""

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.ingress.errors import error_body

TRUSTED_ONLY = ("x-request-disconnect-disabled", "x-request-timeout-seconds")


class RefuseTrustedHeaders:
    """ASGI middleware: 400, naming them, for requests with Ray Serve's trusted headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = sorted({k.decode("latin-1").lower() for k, _ in scope["headers"]})
            sent = [name for name in names if name in TRUSTED_ONLY]
            if sent:
                await _refuse(send, sent)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, names: list[str]) -> None:
    body = error_body(
        f"header(s) {', '.join(names)} may not be sent to this service: they switch off "
        "its disconnect detection or its request timeout; remove them",
        "invalid_request_error",
        names[0],
        "forbidden_header",
    )
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
