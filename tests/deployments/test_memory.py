"""A replica's memory cap (serve_app/deployments/memory.cap_memory) on every card it
sees. No GPU here: torch's CUDA calls are stood in for by a fake of two cards, which
records the fractions set."""

import types

import pytest
import torch

import serve_app.engine
from serve_app.config import ModelSettings
from serve_app.deployments.memory import cap_memory

GIB = 2**30


@pytest.fixture
def cards(monkeypatch):
    """Two visible cards of the given sizes; returns {card: fraction set}."""
    sizes = {0: 80 * GIB, 1: 80 * GIB}
    fractions: dict[int, float] = {}
    for name, fake in {
        "current_device": lambda: 0,
        "device_count": lambda: len(sizes),
        "get_device_properties": lambda i: types.SimpleNamespace(total_memory=sizes[i]),
        "set_per_process_memory_fraction": lambda f, i: fractions.__setitem__(i, f),
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(serve_app.engine, "pick_device", lambda _: torch.device("cuda"))
    return sizes, fractions


def settings(**memory) -> ModelSettings:
    return ModelSettings(id="zimage", model="tiny", memory=memory)


def test_a_cap_holds_on_each_card_the_replica_sees(cards):
    sizes, fractions = cards
    assert cap_memory(settings(cap_bytes=20 * GIB)) == 20 * GIB
    assert fractions == {0: 0.25, 1: 0.25}

    sizes[1] = 40 * GIB  # in bytes, the same cap on a smaller second card
    fractions.clear()
    assert cap_memory(settings(fraction=0.5)) == 40 * GIB
    assert fractions == {0: 0.5, 1: 1.0}


def test_a_cap_over_any_card_is_refused_before_any_is_set(cards):
    sizes, fractions = cards
    sizes[1] = 16 * GIB
    with pytest.raises(ValueError, match="card 1's 16.0 GiB"):
        cap_memory(settings(cap_bytes=20 * GIB))
    assert fractions == {}


def test_the_encoder_has_its_own_cap_and_none_means_none(cards):
    _, fractions = cards
    capped = settings(cap_bytes=20 * GIB, encoder_cap_bytes=8 * GIB)
    assert cap_memory(capped, encoder=True) == 8 * GIB
    assert fractions == {0: 0.1, 1: 0.1}
    fractions.clear()
    assert cap_memory(settings()) is None and fractions == {}
