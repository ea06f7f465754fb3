"""The README's usage snippets run against the test service, as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from load_tests.local_service import ROOT

pytestmark = pytest.mark.serve

README = (ROOT / "README.md").read_text()


def snippet(lang: str, contains: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README, re.S)
    return next(b for b in blocks if contains in b)


def test_the_two_setup_commands_are_make_targets():
    block = snippet("sh", "make serve")
    assert [line.split()[:2] for line in block.splitlines()] == [
        ["make", "serve"],
        ["make", "test"],
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: install$", makefile, re.M)
    assert re.search(r"^test: install$", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def run_here(service, code: list[str], tmp_path: Path) -> None:
    code = [c.replace("http://127.0.0.1:8000", service.url) for c in code]
    subprocess.run(code, cwd=tmp_path, check=True, timeout=120)


def test_curl_snippet(service, tmp_path):
    # The demo model's snippet ("a red circle") runs against `make serve` itself:
    # tests/deploy/test_cli.py.
    run_here(service, ["bash", "-c", snippet("sh", "a red fox")], tmp_path)
    assert Image.open(tmp_path / "fox.png").size == (512, 512)


def test_openai_snippet(service, tmp_path):
    run_here(service, [sys.executable, "-c", snippet("python", "OpenAI(")], tmp_path)
    assert Image.open(tmp_path / "lighthouse.png").size == (512, 512)
