import pytest

from serve_app.engine import LoraOptions, checkpoint, load_denoiser, load_encoder
from serve_app.messages import GenerationParams

# One small request per family, with guidance by each family's own rule.
FAMILY_PARAMS = {
    "zimage": GenerationParams("a cat on a windowsill", None, 256, 256, 6, 0.0, 11),
    "sdxl": GenerationParams("a cat on a windowsill", None, 256, 256, 6, 7.0, 11),
}
MODELS = {"zimage": "tiny", "sdxl": "tiny-sdxl"}


@pytest.fixture(scope="session")
def tiny_path():
    return checkpoint.resolve("tiny")[0]


@pytest.fixture(scope="session")
def sdxl_path():
    return checkpoint.resolve("tiny-sdxl")[0]


@pytest.fixture(scope="session")
def encoder(tiny_path):
    return load_encoder("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def denoiser(tiny_path):
    return load_denoiser("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sdxl_encoder(sdxl_path):
    return load_encoder("tiny-sdxl", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sdxl_denoiser(sdxl_path):
    return load_denoiser("tiny-sdxl", device="cpu", dtype="float32")


@pytest.fixture(scope="session", params=["zimage", "sdxl"])
def family(request):
    """(family, encoder, denoiser, params) of each family in turn."""
    name = request.param
    if name == "zimage":
        enc, den = request.getfixturevalue("encoder"), request.getfixturevalue("denoiser")
    else:
        enc, den = request.getfixturevalue("sdxl_encoder"), request.getfixturevalue("sdxl_denoiser")
    return name, enc, den, FAMILY_PARAMS[name]


@pytest.fixture(scope="session", params=["zimage", "sdxl"])
def lora_family(request):
    """(family, encoder, denoiser with two LoRA slots, checkpoint folder) of each family."""
    name = request.param
    enc = request.getfixturevalue("encoder" if name == "zimage" else "sdxl_encoder")
    den = load_denoiser(
        MODELS[name], device="cpu", dtype="float32", lora=LoraOptions(slots=2, max_rank=8)
    )
    return name, enc, den, checkpoint.resolve(MODELS[name])[0]


def step_module(name: str, den):
    """A module each family's denoiser calls once per step (to count or hook steps)."""
    return den.transformer.t_embedder if name == "zimage" else den.unet


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the "eager" backend, Dynamo reset before and after: Dynamo's
    graphs and guards as compiled, without generating code (which does not change them)."""
    import torch

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "eager"}),
    )
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
