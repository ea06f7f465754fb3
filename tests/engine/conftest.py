import pytest

from serve_app.engine import LoraOptions, checkpoint, load_denoiser, load_encoder
from serve_app.engine.denoiser import LORA_MODES
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


LORA_CASES = [(name, mode) for name in ("zimage", "sdxl") for mode in LORA_MODES]


@pytest.fixture(scope="session", params=LORA_CASES, ids=[f"{n}-{m}" for n, m in LORA_CASES])
def lora_family(request):
    """(family, encoder, denoiser taking two adapters, checkpoint folder) of each family,
    for each way of applying adapters (the denoiser's `lora`: FusedLora or LoraSlots)."""
    name, mode = request.param
    enc = request.getfixturevalue("encoder" if name == "zimage" else "sdxl_encoder")
    lora = LoraOptions(slots=2, max_rank=8, mode=mode)
    den = load_denoiser(MODELS[name], device="cpu", dtype="float32", lora=lora)
    return name, enc, den, checkpoint.resolve(MODELS[name])[0]


def lora_mode(den) -> str:
    """The way `den` applies adapters ("fuse" or "hotswap")."""
    from serve_app.engine.lora import FusedLora

    return "fuse" if isinstance(den.lora, FusedLora) else "hotswap"


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
