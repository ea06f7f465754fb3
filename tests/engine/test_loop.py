"""The shared loop, for each family: cancellation at every point, stage records,
progress order, and requests that never see each other's state."""

import threading
from dataclasses import replace

import numpy as np
import pytest

from serve_app.engine.cancel import CancelToken
from serve_app.engine.stages import StageRecorder
from serve_app.errors import Cancelled
from tests.engine.conftest import step_module


def cancel_on_call(module, token, call_number):
    """Cancel `token` when `module` is called for the `call_number`-th time."""
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == call_number:
            token.cancel()

    return module.register_forward_pre_hook(hook), calls


def test_cancel_before_start_runs_nothing(family):
    name, enc, den, p = family
    emb = enc.encode_params(p)
    token = CancelToken()
    token.cancel()
    handle, calls = cancel_on_call(step_module(name, den), CancelToken(), 0)
    try:
        with pytest.raises(Cancelled) as err:
            den.generate(p, emb, cancel=token)
    finally:
        handle.remove()
    assert (err.value.stage, err.value.steps_done, len(calls)) == ("queued", 0, 0)


def test_cancel_mid_loop_stops_at_the_next_step(family):
    name, enc, den, p = family
    emb = enc.encode_params(p)
    token = CancelToken()
    handle, calls = cancel_on_call(step_module(name, den), token, 3)
    recorder = StageRecorder(den.device)
    try:
        with pytest.raises(Cancelled) as err:
            den.generate(p, emb, cancel=token, recorder=recorder)
    finally:
        handle.remove()
    # The step in flight when the cancel came finishes; no further step starts.
    assert (err.value.stage, err.value.steps_done, err.value.steps_total) == ("denoise", 3, 6)
    assert len(calls) == 3
    assert recorder.stages["denoise"].outcome == "cancelled"
    assert "decode" not in recorder.stages


def test_cancel_during_decode_skips_the_remaining_images(family):
    name, enc, den, p = family
    p = replace(p, num_inference_steps=2, num_images=3)
    emb = enc.encode_params(p)
    token = CancelToken()
    handle, calls = cancel_on_call(den.vae.decoder, token, 1)
    recorder = StageRecorder(den.device)
    try:
        with pytest.raises(Cancelled) as err:
            den.generate(p, emb, cancel=token, recorder=recorder)
    finally:
        handle.remove()
    assert (err.value.stage, err.value.steps_done) == ("decode", 2)
    assert len(calls) == 1
    assert recorder.stages["decode"].outcome == "cancelled"


def test_records_every_stage_and_step(family):
    _, enc, den, p = family
    recorder = StageRecorder(den.device)
    den.generate(p, enc.encode_params(p), recorder=recorder)
    assert set(recorder.stages) == {"denoise", "decode"}
    assert all(rec.outcome == "ok" and rec.seconds > 0 for rec in recorder.stages.values())
    assert len(recorder.step_seconds) == p.num_inference_steps
    assert recorder.vram_peaks() == {"denoise": 0, "decode": 0}  # CPU


def test_images_come_out_contiguous(family):
    """Row-major HxWx3: the PNG encoder took 2.3x as long on the VAE's planar layout."""
    _, enc, den, p = family
    p = replace(p, num_inference_steps=1)
    [pixels] = den.generate(p, enc.encode_params(p))
    assert pixels.shape == (256, 256, 3) and pixels.flags.c_contiguous


def test_concurrent_calls_do_not_share_state(family):
    """Requests running at once on one denoiser each get their own image (SDXL's
    ancestral noise comes from each request's own generator)."""
    _, enc, den, p = family
    seeds = [5, 6, 7, 8]
    emb = enc.encode_params(p)
    alone = {s: den.generate(replace(p, seed=s), emb)[0] for s in seeds}
    together = {}

    def run(seed):
        together[seed] = den.generate(replace(p, seed=seed), emb)[0]

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        np.testing.assert_array_equal(alone[s], together[s])


def test_cancelling_one_request_leaves_the_other_running(family):
    _, enc, den, p = family
    emb = enc.encode_params(p)
    expected = den.generate(p, emb)[0]
    victim, results = CancelToken(), {}

    def run(name, token):
        try:
            results[name] = den.generate(p, emb, cancel=token)[0]
        except Cancelled as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("victim", victim)),
        threading.Thread(target=run, args=("other", CancelToken())),
    ]
    for t in threads:
        t.start()
    victim.cancel()
    for t in threads:
        t.join()
    assert isinstance(results["victim"], Cancelled)
    np.testing.assert_array_equal(results["other"], expected)


def test_different_seeds_give_different_images(family):
    _, enc, den, p = family
    emb = enc.encode_params(p)
    a = den.generate(p, emb)[0]
    b = den.generate(replace(p, seed=p.seed + 1), emb)[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


@pytest.mark.parametrize("when_queued", [False, True])
def test_progress_reports_every_step_then_decode_in_order(family, when_queued):
    """At once (CPU): each report right after its step. When queued (GPU): a step's
    report after the next step's work is launched, the last ones after the decode's."""
    name, enc, den, p = family
    p = replace(p, num_inference_steps=3)
    events = []
    hooks = [
        step_module(name, den).register_forward_pre_hook(lambda *_: events.append("step")),
        den.vae.decoder.register_forward_pre_hook(lambda *_: events.append("vae")),
    ]
    den.progress_when_queued = when_queued
    try:
        den.generate(p, enc.encode_params(p), progress=lambda *r: events.append(r))
    finally:
        den.progress_when_queued = False
        for h in hooks:
            h.remove()
    d1, d2, d3, dec = ("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 3, 3)
    if when_queued:
        assert events == ["step", "step", d1, "step", d2, "vae", d3, dec]
    else:
        assert events == ["step", d1, "step", d2, "step", d3, dec, "vae"]
