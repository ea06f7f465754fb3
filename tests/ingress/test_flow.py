"""The generation flow's bookkeeping, without Ray: its InFlight record is closed even
when the call to close it fails for a while, and a full model is refused from InFlight's
last answer until one of its requests is closed."""

import asyncio

import pytest

from serve_app.errors import Busy
from serve_app.ingress import flow as flow_module
from serve_app.ingress.flow import Flow


class _Close:
    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def remote(self, *args):
        self.calls.append(args)

        async def answer():
            if len(self.calls) <= self.failures:
                raise ConnectionError("InFlight unreachable")

        return answer()


class _Open:
    """InFlight.open: refuses every request with the model full."""

    def __init__(self):
        self.calls = []

    def remote(self, *args):
        self.calls.append(args)

        async def answer():
            return {"reason": "queue", "limit": 4, "retry_after_s": 3}

        return answer()


class _InFlight:
    def __init__(self, failures: int = 0):
        self.close = _Close(failures)
        self.open = _Open()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    real_sleep = asyncio.sleep
    monkeypatch.setattr(flow_module.asyncio, "sleep", lambda s: real_sleep(0))


@pytest.mark.parametrize("failures", [0, 3])
def test_a_record_is_closed_though_closing_fails_for_a_while(failures):
    inflight = _InFlight(failures)

    async def scenario():
        flow = Flow(inflight, {}, {})
        flow._close("r1", "zimage", {"stage": "denoise"}, "owner-1")
        while flow._closing:
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert inflight.close.calls == [("r1", {"stage": "denoise"}, "owner-1")] * (failures + 1)


def test_closing_gives_up_after_its_attempts_and_says_so(caplog):
    inflight = _InFlight(failures=100)

    async def scenario():
        flow = Flow(inflight, {}, {})
        flow._close("r2", "zimage", None, "owner-2")
        while flow._closing:
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert len(inflight.close.calls) == 6
    assert "r2" in caplog.text and "could not be closed" in caplog.text


def test_a_full_model_is_refused_without_a_call_until_one_of_its_requests_is_closed():
    inflight = _InFlight()

    async def refused(flow: Flow, request_id: str, model_id: str = "zimage") -> Busy:
        with pytest.raises(Busy) as refusal:
            await flow.run(request_id, model_id, None, None, None)
        return refusal.value

    async def scenario() -> list[Busy]:
        flow = Flow(inflight, {}, {})
        answers = [await refused(flow, "r1"), await refused(flow, "r2")]
        assert len(inflight.open.calls) == 1  # the second from InFlight's first answer
        answers.append(await refused(flow, "r3", "sdxl"))  # another model: asked
        assert len(inflight.open.calls) == 2
        flow._close("r0", "zimage", None, "owner-0")  # one of zimage's requests ended
        while flow._closing:
            await asyncio.sleep(0)
        answers.append(await refused(flow, "r4"))
        assert len(inflight.open.calls) == 3  # asked again
        return answers

    for busy in asyncio.run(scenario()):
        assert (busy.code, busy.limit, busy.retry_after_s) == ("queue_full", 4, 3)
