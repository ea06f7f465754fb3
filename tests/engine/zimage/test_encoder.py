import pytest
import torch

from serve_app.engine.cancel import CancelToken
from serve_app.errors import Cancelled, PromptTooLong


def test_embeddings_have_the_prompts_real_length(encoder):
    emb = encoder.encode("a cat", "blurry, dark, low quality", with_negative=True)
    n_prompt = len(encoder.token_ids("a cat"))
    n_negative = len(encoder.token_ids("blurry, dark, low quality"))
    assert emb["prompt"].shape == (n_prompt, 32)
    assert emb["negative"].shape == (n_negative, 32)
    assert n_prompt < n_negative < 512
    assert emb["prompt"].device.type == "cpu"


def test_without_guidance_no_negative_is_encoded(encoder):
    assert "negative" not in encoder.encode("a cat", "ignored", with_negative=False)


def test_too_long_prompt_says_how_long_and_the_limit(encoder):
    with pytest.raises(PromptTooLong) as err:
        encoder.encode("word " * 600, None, with_negative=False)
    assert err.value.param == "prompt" and err.value.limit == 512 and err.value.tokens > 512
    assert f"{err.value.tokens} tokens" in str(err.value) and "at most 512" in str(err.value)
    with pytest.raises(PromptTooLong) as err:
        encoder.encode("ok", "word " * 600, with_negative=True)
    assert err.value.param == "negative_prompt"


def test_encode_stops_when_cancelled(encoder):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled) as err:
        encoder.encode("a cat", None, with_negative=False, cancel=token)
    assert err.value.stage == "encode"


def test_the_graphed_forward_computes_what_the_stock_encoder_does(encoder):
    """What the CUDA-graph path relies on: no padding mask, the layers after
    hidden_states[-2] skipped, and padding after the real tokens changes none of them."""
    ids = [encoder.token_ids("a cat on a mat"), encoder.token_ids("a much longer prompt here")]
    padded = encoder._causal_forward(encoder._padded(ids, 64))
    for row, i in enumerate(ids):
        stock = encoder._forward(encoder._padded([i], len(i)), None)[0]
        torch.testing.assert_close(padded[row, : len(i)], stock, rtol=1e-5, atol=1e-5)
