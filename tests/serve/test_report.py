"""`python -m serve_app.report` against the test service: small sizes, as the CPU is slow."""

import argparse
import json
import subprocess
import sys

import pytest

from serve_app.report import STAGES, Config

pytestmark = pytest.mark.serve


def report(service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve_app.report", "--url", service.url, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_report_prints_every_stage_of_every_config_and_writes_markdown(service, tmp_path):
    out = tmp_path / "report.md"
    done = report(
        service, "--config", "256x256:2", "--config", "512x512:2:1.5", "--runs", "2",
        "--warmup", "0", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_text() == done.stdout
    lines = done.stdout.splitlines()
    assert "| size | steps | guidance | stage | latency ms | VRAM peak |" in lines
    first_rows = [line for line in lines if line.startswith(("| 256x256 ", "| 512x512 "))]
    assert [r.split("|")[1:5] for r in first_rows] == [
        [" 256x256 ", " 2 ", " 0.0 ", " encode "],
        [" 512x512 ", " 2 ", " 1.5 ", " encode "],
    ]
    stages = [line.split("|")[4].strip() for line in lines if line.startswith("| ")][1:]
    assert stages == [*STAGES, *STAGES]
    denoise = next(line for line in lines if "| denoise |" in line)
    assert "/step)" in denoise and denoise.rstrip().endswith("0 B |")  # no VRAM on CPU


def test_report_json_has_latency_and_vram_per_stage(service, tmp_path):
    out = tmp_path / "report.json"
    done = report(
        service, "--config", "256x256:1", "--runs", "1", "--warmup", "0", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["family"] == "zimage" and data["runs"] == 1
    (row,) = data["rows"]
    assert row["error"] is None and row["size"] == "256x256" and row["num_inference_steps"] == 1
    assert list(row["latency_ms"]) == list(STAGES)
    assert row["latency_ms"]["e2e"] >= row["latency_ms"]["denoise"] > 0
    assert row["vram_peak_bytes"] == {"encode": 0, "adapters": 0, "denoise": 0, "decode": 0}


def test_a_refused_config_is_a_row_saying_why_and_the_rest_still_run(service):
    done = report(
        service, "--config", "4096x4096", "--config", "256x256:1", "--runs", "1", "--warmup", "0"
    )
    assert done.returncode == 0, done.stderr
    refused = next(line for line in done.stdout.splitlines() if line.startswith("| 4096x4096 "))
    assert "| error | 400 invalid_value: size '4096x4096'" in refused
    assert "| 256x256 | 1 | 0.0 | encode |" in done.stdout


def test_an_unreachable_service_is_an_error_not_an_empty_report(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.report", "--url", "http://127.0.0.1:9", "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot ask http://127.0.0.1:9/v1/models" in done.stderr and done.stdout == ""


def test_config_syntax():
    assert Config.parse("1280x768:20:3.5") == Config(1280, 768, 20, 3.5)
    assert Config.parse("1024x1024") == Config(1024, 1024)
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        Config.parse("1024")


def test_the_report_imports_no_torch():
    code = "import sys, serve_app.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
