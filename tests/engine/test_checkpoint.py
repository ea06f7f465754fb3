import json

import pytest
import torch
from safetensors.torch import load_file

from serve_app.engine import checkpoint
from serve_app.engine.zimage.tiny import TINY_NAME, build_tiny_pipeline, ensure_tiny


def test_tiny_is_a_diffusers_zimage_folder(tiny_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    for part in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        assert (tiny_path / part).is_dir()
    assert checkpoint.resolve(str(tiny_path)) == (tiny_path, "zimage")


def test_tiny_is_generated_deterministically(tmp_path, tiny_path):
    fresh = ensure_tiny(tmp_path)
    assert fresh == tmp_path / TINY_NAME
    for part in (
        "transformer/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ):
        a = load_file(tiny_path / f"{part}.safetensors")
        b = load_file(fresh / f"{part}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_path / "tokenizer/tokenizer.json").read_text() == (
        fresh / "tokenizer/tokenizer.json"
    ).read_text()


def test_tiny_sdxl_is_a_diffusers_sdxl_folder_with_adapters(sdxl_path):
    index = json.loads((sdxl_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (sdxl_path / part).is_dir()
    assert checkpoint.resolve(str(sdxl_path)) == (sdxl_path, "sdxl")
    assert checkpoint.resolve("tiny-sdxl") == (sdxl_path, "sdxl")
    adapters = sorted(p.name for p in (sdxl_path / "loras").iterdir())
    assert adapters == ["tiny-kohya.safetensors", "tiny-style.safetensors"]


def test_tiny_tokenizer_has_a_chat_template():
    tok = build_tiny_pipeline().tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no model_index.json"):
        checkpoint.resolve(str(tmp_path))


def test_an_unsupported_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(checkpoint.CheckpointError, match="'FluxPipeline' is not served"):
        checkpoint.resolve(str(tmp_path))


def test_a_checkpoint_s_own_presets_replace_its_family_s(tmp_path, tiny_path):
    import shutil

    from serve_app.engine import load_denoiser

    own = {
        "presets": {"small": {"width": 256, "height": 256, "num_inference_steps": 3,
                              "guidance_scale": 2.0}},
        "default_preset": "small",
    }  # fmt: skip
    folder = tmp_path / "with-presets"
    shutil.copytree(tiny_path, folder)
    (folder / checkpoint.PRESETS_FILE).write_text(json.dumps(own))
    denoiser = load_denoiser(str(folder), "cpu")
    assert (denoiser.presets, denoiser.default_preset) == (own["presets"], "small")
    assert load_denoiser(str(tiny_path), "cpu").default_preset == "turbo"  # no file: family's


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "unreadable"),
        ('{"presets": {}}', "unreadable"),
        ('{"presets": {"a": {}}, "default_preset": "b"}', "'b' is not among its presets"),
    ],
)
def test_an_unusable_presets_file_is_refused(tmp_path, content, message):
    (tmp_path / checkpoint.PRESETS_FILE).write_text(content)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.read_presets(tmp_path)
