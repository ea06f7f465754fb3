"""The generation flow's bookkeeping, without Ray: its InFlight record is closed even
when the call to close it fails for a while."""

import asyncio

import pytest

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


class _InFlight:
    def __init__(self, failures: int):
        self.close = _Close(failures)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    real_sleep = asyncio.sleep
    monkeypatch.setattr(flow_module.asyncio, "sleep", lambda s: real_sleep(0))


@pytest.mark.parametrize("failures", [0, 3])
def test_a_record_is_closed_though_closing_fails_for_a_while(failures):
    inflight = _InFlight(failures)

    async def scenario():
        flow = Flow(inflight, {}, {})
        flow._close("r1", {"stage": "denoise"}, "owner-1")
        while flow._closing:
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert inflight.close.calls == [("r1", {"stage": "denoise"}, "owner-1")] * (failures + 1)


def test_closing_gives_up_after_its_attempts_and_says_so(caplog):
    inflight = _InFlight(failures=100)

    async def scenario():
        flow = Flow(inflight, {}, {})
        flow._close("r2", None, "owner-2")
        while flow._closing:
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert len(inflight.close.calls) == 6
    assert "r2" in caplog.text and "could not be closed" in caplog.text
