"""The shipped demo model draws what it is asked, through the service's engine, on the
CPU. Held-aside captions are scenes it never saw in training (training/shapes.py)."""

import numpy as np
import pytest

from serve_app.engine.checkpoint import SHIPPED, read_presets, resolve
from training.evaluate import Drawer, check, colour_at, colour_away, hollow
from training.shapes import HELD_ASIDE, held_aside

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def drawer() -> Drawer:
    return Drawer("demo", "cpu")


@pytest.fixture(scope="module")
def preset() -> dict:
    presets, default = read_presets(SHIPPED["demo"])
    p = presets[default]
    return {"steps": p["num_inference_steps"], "guidance": p["guidance_scale"]}


def test_the_demo_is_a_z_image_checkpoint_with_its_presets_and_adapter():
    path, family = resolve("demo")
    assert family == "zimage"
    presets, default = read_presets(path)
    assert default == "demo" and presets["outline"]["loras"] == [{"name": "outline", "scale": 0.85}]
    assert (path / "loras" / "outline.safetensors").is_file()
    size = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert size <= 25 * 2**20, size


def test_a_red_circle_on_a_blue_background(drawer, preset):
    for seed in (0, 1, 2):
        image = drawer("a red circle on a blue background", seed, **preset)
        assert (colour_at(image, "centre"), colour_away(image, ["centre"])) == ("red", "blue")


def test_held_aside_captions_draw_the_asked_colours_at_the_asked_places(drawer, preset):
    checks = [
        check(drawer(scene.caption, seed, **preset), scene, seed)
        for scene in (held_aside(*h) for h in HELD_ASIDE)
        for seed in SEEDS
    ]
    wrong = [c for c in checks if not c.right]
    # 10 of 10 measured on the 2-core CPU (README, "What it draws"); one miss allowed.
    assert len(wrong) <= 1, wrong


def test_guidance_changes_the_image(drawer, preset):
    caption = held_aside(*HELD_ASIDE[0]).caption
    guided = drawer(caption, 0, **preset).astype(np.float32)
    unguided = drawer(caption, 0, steps=preset["steps"], guidance=0.0).astype(np.float32)
    assert np.abs(guided - unguided).mean() > 3.0


def test_previews_converge_to_the_image(drawer, preset):
    previews = []
    image = drawer(
        "a white star at the bottom on a blue background",
        0,
        **preset,
        partial_images=3,
        on_preview=lambda index, step, pixels: previews.append(pixels.astype(np.float32)),
    )
    assert len(previews) == 3
    h, w = previews[0].shape[:2]
    small = image.reshape(h, image.shape[0] // h, w, image.shape[1] // w, 3).mean(axis=(1, 3))
    distances = [np.abs(p - small).mean() for p in previews]
    assert distances[0] > distances[1] > distances[2], distances


def test_the_outline_adapter_hollows_the_shapes_and_at_scale_0_does_nothing(drawer, preset):
    scenes = [held_aside(*h) for h in HELD_ASIDE]
    plain = [drawer(s.caption, 0, **preset) for s in scenes]
    styled = [drawer(s.caption, 0, **preset, lora=("outline", 0.85)) for s in scenes]
    off = drawer(scenes[0].caption, 0, **preset, lora=("outline", 0.0))
    assert np.array_equal(off, plain[0])
    assert not any(hollow(image, s) for image, s in zip(plain, scenes, strict=True))
    # 4 of 5 measured at seed 0; 14 of 15 over seeds 0-2 (README, "What it draws").
    drawn = [hollow(image, s) for image, s in zip(styled, scenes, strict=True)]
    assert sum(drawn) >= 4, drawn
