"""training/forward.py's batched forward against ZImageTransformer2DModel's own."""

import pytest
import torch
from peft import LoraConfig

from training.forward import forward, padded_length
from training.train_demo import build


@pytest.fixture(scope="module")
def transformer():
    tr = build().transformer
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():  # some start at zero (the final layer): all random
            p.normal_(0, 0.1)
    return tr.eval()


def stock(tr, x, t, cap, lengths, lora_scale=None):
    kwargs = {"joint_attention_kwargs": {"scale": lora_scale}} if lora_scale else {}
    out = tr(
        list(x.unsqueeze(2).unbind(0)),
        t,
        [c[:n] for c, n in zip(cap, lengths.tolist(), strict=True)],
        return_dict=False,
        **kwargs,
    )[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize("lengths", [[5, 20, 32], [33, 40, 64, 50]])
def test_the_batched_forward_is_the_stock_forward(transformer, lengths):
    torch.manual_seed(1)
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), 16, 16, 16)
    t = torch.rand(len(lengths))
    cap = torch.randn(len(lengths), padded_length(int(lengths.max())), 64)
    with torch.no_grad():
        expected = stock(transformer, x, t, cap, lengths)
        got = forward(transformer, x, t, cap, lengths)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_with_an_adapter_at_a_scale(transformer):
    names = ["layers.0.attention.to_q", "layers.1.feed_forward.w1"]
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights=False), "a"
    )
    try:
        torch.manual_seed(2)
        lengths = torch.tensor([7, 30])
        x, t, cap = torch.randn(2, 16, 16, 16), torch.rand(2), torch.randn(2, 32, 64)
        with torch.no_grad():
            base = forward(transformer, x, t, cap, lengths, lora_scale=0.0)
            expected = stock(transformer, x, t, cap, lengths, lora_scale=0.85)
            got = forward(transformer, x, t, cap, lengths, lora_scale=0.85)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        assert (got - base).abs().max() > 1e-3
    finally:
        transformer.delete_adapters("a")


def test_unpadded_captions_are_refused(transformer):
    with pytest.raises(ValueError, match="not padded"):
        forward(
            transformer,
            torch.randn(1, 16, 16, 16),
            torch.rand(1),
            torch.randn(1, 20, 64),
            torch.tensor([20]),
        )
