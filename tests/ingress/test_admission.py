"""An ingress replica's memory of full models (ingress/admission.py): InFlight's refusal
stands until a request of the model is closed here or its time passes, and never one
that a close may have overtaken."""

import pytest

from serve_app.errors import Busy
from serve_app.ingress import admission
from serve_app.ingress.admission import FullModels


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    return now


def full(limit: int = 4, retry_after_s: int = 3) -> Busy:
    return Busy("queue", limit, retry_after_s)


def test_a_refusal_stands_for_its_time_then_inflight_is_asked_again(clock):
    models = FullModels(hold_s=0.25)
    assert models.refusal("zimage") is None
    models.refused("zimage", full(), models.closes("zimage"))
    kept = models.refusal("zimage")
    assert (kept.code, kept.limit, kept.retry_after_s) == ("queue_full", 4, 3)
    assert models.refusal("sdxl") is None
    clock[0] += 0.25
    assert models.refusal("zimage") is not None
    clock[0] += 0.01
    assert models.refusal("zimage") is None


def test_a_closed_request_frees_its_model(clock):
    models = FullModels(hold_s=10)
    models.refused("zimage", full(), models.closes("zimage"))
    models.refused("sdxl", full(), models.closes("sdxl"))
    models.closed("zimage")
    assert models.refusal("zimage") is None
    assert models.refusal("sdxl") is not None


def test_a_refusal_asked_before_a_close_is_not_kept(clock):
    models = FullModels(hold_s=10)
    asked_at = models.closes("zimage")
    models.closed("zimage")  # closed while InFlight's answer was on its way
    models.refused("zimage", full(), asked_at)
    assert models.refusal("zimage") is None


def test_a_key_at_its_limit_says_nothing_of_the_model(clock):
    models = FullModels(hold_s=10)
    models.refused("zimage", Busy("key_limit", 1, 1), models.closes("zimage"))
    assert models.refusal("zimage") is None
