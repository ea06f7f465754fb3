"""A detached task's handle calls are not the calls of the request that started it, so
Ray Serve does not cancel them with that request (ray.serve.context keys a request's
child calls by the _internal_request_id in the context they are made in)."""

import asyncio

from ray.serve.context import _get_serve_request_context, _RequestContext, _serve_request_context

from serve_app.ingress.detached import detached


def test_a_detached_task_runs_outside_the_request_that_started_it():
    async def request_id_seen() -> str:
        return _get_serve_request_context()._internal_request_id

    async def within_a_request() -> tuple[str, str]:
        _serve_request_context.set(
            _RequestContext(
                _internal_request_id="the-request", cancel_on_parent_request_cancel=True
            )
        )
        inherited = await asyncio.ensure_future(request_id_seen())
        own = await detached(request_id_seen())
        return inherited, own

    assert asyncio.run(within_a_request()) == ("the-request", "")
