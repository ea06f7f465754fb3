import pytest
import torch

from serve_app.engine.sdxl import uses_guidance
from serve_app.errors import PromptTooLong
from serve_app.messages import GenerationParams


def test_embeddings_of_both_encoders_side_by_side_and_pooled(sdxl_encoder):
    emb = sdxl_encoder.encode("a cat", "blurry", with_negative=True)
    assert emb["prompt_embeds"].shape == (77, 64)  # 32 (CLIP-L) + 32 (bigG), 77 tokens
    assert emb["pooled"].shape == (32,)
    assert emb["negative_prompt_embeds"].shape == (77, 64)
    assert not torch.equal(emb["prompt_embeds"], emb["negative_prompt_embeds"])


def test_without_a_negative_prompt_guidance_steers_from_zeros(sdxl_encoder):
    emb = sdxl_encoder.encode("a cat", None, with_negative=True)
    assert not emb["negative_prompt_embeds"].any() and not emb["negative_pooled"].any()


def test_guidance_is_on_above_one_as_in_the_stock_pipeline():
    p = GenerationParams("a", None, 256, 256, 4, 1.0, 0)
    assert not uses_guidance(p)
    assert uses_guidance(GenerationParams("a", None, 256, 256, 4, 1.5, 0))


def test_a_prompt_past_77_tokens_is_refused_not_cut(sdxl_encoder):
    with pytest.raises(PromptTooLong) as err:
        sdxl_encoder.encode("word " * 100, None, with_negative=False)
    assert err.value.limit == 77 and err.value.tokens > 77
    with pytest.raises(PromptTooLong) as err:
        sdxl_encoder.encode("ok", "word " * 100, with_negative=True)
    assert err.value.param == "negative_prompt"
