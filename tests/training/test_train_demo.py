"""training/train_demo.py end to end at a few steps a phase: what it saves loads through
the service's engine, as a download does, with its presets and adapter."""

import json

import numpy as np
import torch

from serve_app.engine.checkpoint import read_presets, resolve
from training.evaluate import Drawer
from training.train_demo import PLANS, PRESETS, resume, train


def test_training_saves_a_checkpoint_the_service_loads(tmp_path):
    out = tmp_path / "demo"
    report = train(out, PLANS["smoke"], torch.device("cpu"), log=lambda *_: None)
    assert set(report["phases"]) == {"vae", "dit", "lora"}
    assert all(p["steps"] > 0 for p in report["phases"].values())
    assert json.loads((out / "training.json").read_text())["phases"] == report["phases"]
    assert resolve(str(out)) == (out, "zimage")
    assert read_presets(out) == (PRESETS["presets"], PRESETS["default_preset"])
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] > 0 and vae["latent_channels"] == 16

    drawer = Drawer(str(out), "cpu")
    plain = drawer("a red circle on a blue background", 0, steps=2, guidance=2.0)
    styled = drawer(
        "a red circle on a blue background", 0, steps=2, guidance=2.0, lora=("outline", 0.85)
    )
    assert plain.shape == styled.shape == (256, 256, 3)
    assert not np.array_equal(plain, styled)  # the adapter was trained: not zero

    # Resuming trains the same folder further and records it.
    before = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    resume(out, PLANS["smoke"], torch.device("cpu"), seed=1, log=lambda *_: None)
    after = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert before != after
    assert len(json.loads((out / "training.json").read_text())["continued"]) == 1
