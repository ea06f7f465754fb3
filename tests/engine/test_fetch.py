"""Weights from a URI: copied once per node, checked against SHA256SUMS, never loaded
half-copied or corrupt (file:// here; s3:// and gs:// go through the same fsspec path)."""

import shutil
import subprocess
import sys

import pytest

from serve_app.engine import load_denoiser
from serve_app.engine.checkpoint import CheckpointError, resolve
from serve_app.engine.fetch import SUMS, local_copy, write_sums
from serve_app.engine.zimage.tiny import ensure_tiny


@pytest.fixture
def source(tmp_path):
    """A checkpoint folder where an operator keeps it, with its SHA256SUMS."""
    folder = tmp_path / "store" / "zimage-tiny"
    shutil.copytree(ensure_tiny(tmp_path / "generated"), folder)
    write_sums(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_a_file_uri_is_copied_once_checked_and_loaded(source, cache):
    uri = source.as_uri()
    path, family = resolve(uri)
    assert family == "zimage" and path.is_relative_to(cache)
    listed = [line.split("  ", 1)[1] for line in (source / SUMS).read_text().splitlines()]
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == (
        sorted([*listed, SUMS, ".verified"])
    )
    load_denoiser(uri, "cpu")  # loads from the copy
    shutil.rmtree(source)  # the copy is used from now on: the source is not read again
    assert resolve(uri) == (path, "zimage")


def test_a_corrupt_file_is_refused_and_nothing_is_left(source, cache):
    weights = next(source.glob("transformer/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors is corrupt"):
        resolve(source.as_uri())
    assert [p.name for p in (cache / "fetched").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: shutil.rmtree(s), "no such folder"),
        (lambda s: (s / SUMS).unlink(), r"no SHA256SUMS in it; make one .* serve_app.engine.fetch"),
        (lambda s: (s / "model_index.json").unlink(), "model_index.json, which is missing"),
        (lambda s: (s / SUMS).write_text("not a sum\n"), "line 1 is not 'SHA256  PATH'"),
        (lambda s: (s / SUMS).write_text(f"{'0' * 64}  ../escape\n"), "line 1"),
    ],
)
def test_a_missing_or_unusable_source_says_what_is_wrong(source, cache, damage, message):
    damage(source)
    with pytest.raises(CheckpointError, match=message):
        local_copy(source.as_uri(), cache)


def test_an_unknown_protocol_names_its_package(cache):
    with pytest.raises(CheckpointError, match=r"cannot read nosuch:// URIs"):
        local_copy("nosuch://bucket/model", cache)


COPY = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from serve_app.engine.fetch import local_copy
print(local_copy(sys.argv[1], Path(sys.argv[2])))
"""


def test_replicas_starting_together_copy_once(source, cache):
    """Four processes on one node at once: one copies, the others wait and use it."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", COPY, source.as_uri(), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert len({out for out, _ in outputs}) == 1  # the same folder for all
    assert sum("copied" in err for _, err in outputs) == 1, outputs
