import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig


def config(**model) -> dict:
    return {"models": [{"id": "m", **model}]}


def test_a_misspelt_model_setting_fails():
    with pytest.raises(ValidationError, match="lora_dri"):
        AppConfig.model_validate(config(lora_dri="/x"))


def test_model_ids_are_unique_and_plain():
    with pytest.raises(ValidationError, match="repeated: m"):
        AppConfig.model_validate({"models": [{"id": "m"}, {"id": "m"}]})
    with pytest.raises(ValidationError, match="id"):
        AppConfig.model_validate(config(id="../m"))


def test_presets_are_checked_against_the_limits_and_each_other():
    preset = {"width": 1024, "height": 4096, "num_inference_steps": 9, "guidance_scale": 0.0}
    with pytest.raises(ValidationError, match="max_side 2048"):
        AppConfig.model_validate(config(presets={"tall": preset}))
    with pytest.raises(ValidationError, match="default_preset 'nope'"):
        AppConfig.model_validate(
            config(presets={"ok": {**preset, "height": 1024}}, default_preset="nope")
        )
    with pytest.raises(ValidationError, match="at least 1"):
        AppConfig.model_validate(config(presets={}))


def test_each_model_has_its_own_deployment_names():
    app = AppConfig.model_validate({"models": [{"id": "zimage"}, {"id": "sdxl"}]})
    assert [m.deployment_names() for m in app.models] == [
        ("PromptEncoder-zimage", "Denoiser-zimage"),
        ("PromptEncoder-sdxl", "Denoiser-sdxl"),
    ]
