import pytest

from serve_app.engine import checkpoint, load_denoiser, load_encoder


@pytest.fixture(scope="session")
def tiny_path():
    return checkpoint.resolve("tiny")[0]


@pytest.fixture(scope="session")
def encoder(tiny_path):
    return load_encoder("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def denoiser(tiny_path):
    return load_denoiser("tiny", device="cpu", dtype="float32")
