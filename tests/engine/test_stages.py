import time

import pytest
import torch

from serve_app.engine.stages import StageRecorder
from serve_app.errors import Cancelled


def test_a_stage_that_finishes_is_ok_and_timed():
    rec = StageRecorder(torch.device("cpu"))
    with rec.stage("encode"):
        time.sleep(0.02)
    assert rec.stages["encode"].outcome == "ok"
    assert 0.02 <= rec.stages["encode"].seconds < 1
    assert rec.timings_ms()["encode"] >= 20
    assert rec.vram_peaks() == {"encode": 0}


def test_a_stage_that_raises_is_recorded_as_error_and_the_error_propagates():
    rec = StageRecorder(torch.device("cpu"))
    with pytest.raises(ZeroDivisionError), rec.stage("denoise"):
        time.sleep(0.01)
        1 / 0  # noqa: B018
    assert rec.stages["denoise"].outcome == "error"
    assert rec.stages["denoise"].seconds >= 0.01


def test_a_cancelled_stage_is_recorded_as_cancelled():
    rec = StageRecorder(torch.device("cpu"))
    with pytest.raises(Cancelled), rec.stage("decode"):
        raise Cancelled("decode", 9, 9)
    assert rec.stages["decode"].outcome == "cancelled"


def test_steps_are_timed_only_when_they_finish():
    rec = StageRecorder(torch.device("cpu"))
    with rec.step():
        time.sleep(0.01)
    with pytest.raises(RuntimeError), rec.step():
        raise RuntimeError("boom")
    assert len(rec.step_seconds) == 1 and rec.step_seconds[0] >= 0.01
