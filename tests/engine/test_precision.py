"""Int8 text-encoder weights (a model's `encoder_precision: int8`): every family's encoder
loads with them on the CPU, holds its linear weights at a quarter of float32's bytes, and
encodes a prompt close to the float32 encoder; and a quantised tensor's bytes are its
inner tensors'."""

import dataclasses

import pytest
import torch

from serve_app.engine import load_encoder
from serve_app.engine.precision import tensor_bytes, weights_bytes
from tests.engine.conftest import FAMILY_PARAMS, MODELS


def linear_weights(encoder) -> list[torch.Tensor]:
    return [
        m.weight for t in encoder.modules for m in t.modules() if isinstance(m, torch.nn.Linear)
    ]


@pytest.mark.parametrize("family", ["zimage", "sdxl"])
def test_int8_encoder_keeps_the_embeddings_in_a_quarter_of_the_linear_bytes(family):
    params = dataclasses.replace(FAMILY_PARAMS[family], negative_prompt="blurry")
    full = load_encoder(MODELS[family], "cpu", "float32")
    int8 = load_encoder(MODELS[family], "cpu", "float32", precision="int8")
    weights = linear_weights(int8)
    assert weights and all(type(w).__name__ == "Int8Tensor" for w in weights)
    assert not any(type(w).__name__ == "Int8Tensor" for w in linear_weights(full))
    # int8 data and a float32 scale (and zero point) per output channel, against float32
    full_linear = sum(tensor_bytes(w) for w in linear_weights(full))
    assert sum(tensor_bytes(w) for w in weights) < 0.3 * full_linear
    assert weights_bytes(int8.modules) < weights_bytes(full.modules) - 0.7 * full_linear
    expected, got = full.encode_params(params), int8.encode_params(params)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        error = (got[name].float() - tensor.float()).norm() / tensor.float().norm()
        assert 0 < error < 0.02, (name, float(error))


def test_an_unknown_encoder_precision_is_refused():
    with pytest.raises(ValueError, match="encoder precision 'fp4'"):
        load_encoder("tiny", "cpu", precision="fp4")


def test_a_plain_tensor_counts_its_elements():
    assert tensor_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30


def test_quantising_leaves_inductors_settings_alone():
    """torchao's configs turn on coordinate-descent tuning for the whole process unless
    told not to: every kernel compiled after it timed in dozens of variants (a float8
    replica's warm-up past 470 s on an H100; *-2026-12-06-f8-inductor*)."""
    import torch._inductor.config as inductor

    settings = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                "force_fuse_int_mm_with_mul")  # fmt: skip
    with inductor.patch({name: False for name in settings}):
        load_encoder("tiny", "cpu", "float32", precision="int8")
        assert {name: getattr(inductor, name) for name in settings} == dict.fromkeys(
            settings, False
        )
