"""The request-memory predictor against the GPU measurements it was fitted to."""

import json
from pathlib import Path

import pytest

from serve_app import vram
from serve_app.errors import WillNotFit
from serve_app.messages import GenerationParams
from serve_app.schema import Limits

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def params(side: int, n: int = 1, guidance: float = 0.0) -> GenerationParams:
    return GenerationParams("x", None, side, side, 9, guidance, 0, n)


@pytest.mark.parametrize("family", ["zimage", "sdxl"])
def test_the_fit_predicts_every_measured_case_within_its_margin(family):
    data = json.loads((ROOT / "serve_app" / "data" / "vram.json").read_text())
    run = json.loads((ROOT / data["source"]).read_text())["families"][family]
    resident = run["loaded"]["allocated"]
    for case in run["cases"]:
        p = params(case["side"], case["images"], 5.0 if case["guided"] else 0.0)
        predicted = vram.predict(family, p, case["guided"], resident)
        measured = resident + case["extra_bytes"]
        # Never under what was measured; over by at most the margin and the fit's error.
        assert measured <= predicted <= resident + case["extra_bytes"] * (vram.MARGIN + 0.06)


def memory(budget: int | None, resident: int = 12 * GiB) -> dict:
    return {"budget_bytes": budget, "resident_bytes": resident, "guidance_above": 0.0}


def test_a_request_over_the_budget_is_refused_naming_the_largest_size_that_fits():
    limits = Limits(256, 2048, 16)
    vram.check_fits("zimage", params(1024), memory(16 * GiB), limits)  # fits
    with pytest.raises(WillNotFit) as refused:
        vram.check_fits("zimage", params(2048), memory(16 * GiB), limits)
    side = refused.value.largest_side
    assert 1024 <= side < 2048 and side % 16 == 0
    vram.check_fits("zimage", params(side), memory(16 * GiB), limits)
    with pytest.raises(WillNotFit):
        vram.check_fits("zimage", params(side + 16), memory(16 * GiB), limits)
    assert f"{side}x{side}" in str(refused.value)


def test_no_budget_refuses_nothing_and_no_room_names_no_size():
    limits = Limits(256, 2048, 16)
    vram.check_fits("sdxl", params(2048, 4, 7.0), memory(None), limits)
    with pytest.raises(WillNotFit, match="no size fits") as refused:
        vram.check_fits("sdxl", params(512), memory(12 * GiB + 2**20), limits)
    assert refused.value.largest_side == 0
