"""The Denoiser replica's out-of-memory healing, in this process (no Ray): the device
is made to fail as a full card does (torch.OutOfMemoryError from the VAE's call)."""

import asyncio

import pytest
import torch

from serve_app.config import ModelSettings
from serve_app.deployments.denoiser import Denoiser
from serve_app.engine import load_encoder
from serve_app.engine.embeddings import to_arrays
from serve_app.errors import DoesNotFit
from serve_app.messages import EncodedPrompt, Generated, GenerationParams

PARAMS = GenerationParams("a red square", None, 256, 256, 2, 0.0, 0)


@pytest.fixture(scope="module")
def replica():
    return Denoiser.func_or_class(
        ModelSettings(id="zimage", model="tiny", memory={"unhealthy_after_ooms": 2})
    )


@pytest.fixture(scope="module")
def prompt() -> EncodedPrompt:
    arrays, dtypes = to_arrays(load_encoder("tiny").encode_params(PARAMS))
    return EncodedPrompt(arrays, dtypes, {}, {})


async def _draw(replica, prompt) -> list:
    return [e async for e in replica.generate("r", PARAMS, prompt, 0.0)]


def test_out_of_memory_is_answered_counted_and_healed(replica, prompt, monkeypatch):
    def full_card(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (forced)")

    # The decode: where a large request's memory peaks (load_tests/results/*-vram.json).
    monkeypatch.setattr(replica.engine.vae, "decode", full_card)
    with pytest.raises(DoesNotFit, match="ran out of GPU memory during decode"):
        asyncio.run(_draw(replica, prompt))
    assert replica.ooms_in_a_row == 1
    replica.check_health()  # one is not enough to be replaced

    with pytest.raises(DoesNotFit):
        asyncio.run(_draw(replica, prompt))
    with pytest.raises(RuntimeError, match="2 requests in a row ran out of device memory"):
        replica.check_health()  # Ray replaces a replica whose check fails

    monkeypatch.undo()  # the card has room again: the replica serves, and is healthy
    events = asyncio.run(_draw(replica, prompt))
    assert isinstance(events[-1], Generated) and events[-1].images[0].shape == (256, 256, 3)
    assert replica.ooms_in_a_row == 0
    replica.check_health()
    assert replica.worker.idle


def test_the_demo_offers_its_own_presets_and_adapter():
    replica = Denoiser.func_or_class(ModelSettings(id="demo", model="demo"))
    offered = replica.presets_offered()
    assert replica.default_preset == "demo" and set(offered) == {"demo", "outline"}
    assert offered["demo"]["width"] == 256 and offered["demo"]["loras"] == []
    assert offered["outline"]["loras"] == [{"name": "outline", "scale": 0.85}]
