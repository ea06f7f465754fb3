"""The GPU benchmark harness, run end to end on the tiny model on the CPU so that it
cannot rot. A smoke run: it checks what the harness writes, never how fast anything is."""

import json
import subprocess
import sys

import pytest

from load_tests.local_service import ROOT

pytestmark = pytest.mark.serve  # its service phase starts a real Ray Serve application


def test_harness_smoke_run(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "load_tests.bench_gpu", "--tiny", "--device", "cpu",
         "--runs", "1", "--out", str(tmp_path), "--phases", "levers", "reference", "stock",
         "engine", "sweep", "service", "restart", "fp8_eager", "fp8", "profile_24gb", "sdxl",
         "lora",
         "--service-parts", "configs", "throughput", "card", "vram_table", "cancellations",
         "--disconnects", "4", "--service-env", "T2I_BENCH_SMOKE=1", "--keep-going"],
        cwd=ROOT,
        check=True,
        timeout=600,
    )  # fmt: skip
    [result_file] = tmp_path.glob("cpu-*.json")
    result = json.loads(result_file.read_text())
    names = [c["name"] for c in result["configs"]]
    assert names == ["1024-turbo", "1024-guidance5"]
    for path in ("stock", "engine", "service"):
        for name in names:
            assert result[path][name]["e2e"]["n"] == 1, (path, name)
    assert result["engine"]["1024-turbo"]["stages"]["denoise"]["p50_ms"] > 0
    assert result["stock"]["1024-turbo"]["step_ms"] > 0
    assert set(result["throughput"]) == {"1", "4", "16"}
    # The whole card per configuration, beside stock's (no nvidia-smi here: zeros).
    assert set(result["service_card"]) == set(names)
    assert result["service_card"]["1024-turbo"]["stock_card_peak_mib"] == 0
    levers = result["levers"]
    assert levers["step_ours_eager_rel_err_vs_fp32"] < 1e-5  # fp32 on the CPU: same math
    assert levers["png_isal1_random_weights_output_bytes"] > 0
    assert set(result["ratios"]["1024-turbo"]) == {
        "engine_over_stock",
        "service_over_stock",
        "http_and_image_encoding_share",
    }
    assert all(row["match"] for row in result["vram_table"])  # answer == exported metric
    restart = result["service_restart"]  # started again on the cache the first start filled
    assert restart["same_pixels_as_first_start"] is True
    assert restart["vs_first_start"]["max_abs"] == 0
    assert restart["repeat_vs_first"]["max_abs"] == 0
    assert result["service"]["1024-turbo"]["repeat_vs_first"]["max_abs"] == 0
    assert restart["denoiser"]["compile_cache"]["dir"]
    parts = restart["denoiser"]["startup_s"]  # where the Denoiser's start-up went
    assert min(parts.values()) >= 0, parts
    assert abs(sum(parts.values()) - restart["denoiser"]["ready_s"]) < 0.01, parts
    assert "| service, restarted |" in result_file.with_suffix(".md").read_text()
    assert result["service_setup"]["env"] == {"T2I_BENCH_SMOKE": "1"}
    assert result["cancellations"]["disconnects"] == 4
    assert result["cancellations"]["request_after_status"] == 200
    assert len(result["sweep"]) == 2 * 2 * 2  # sizes x guidance x steps
    # float8 cannot run on a CPU: refused, recorded, and the next phases ran.
    assert list(result["failed_phases"]) == ["fp8_eager"]
    assert "compute capability" in result["failed_phases"]["fp8_eager"]
    # Every path's image of seed 0 against stock's (float32 on a CPU: the same math).
    equivalence = result["equivalence"]
    for path in ("engine", "service", "fp8", "profile_24gb"):
        row = equivalence[path]["1024-turbo"]
        assert row["vs_stock_bf16"]["max_abs"] <= 1, (path, row)
    # (the fp8 phase ran in the default precision here: its latents are the engine's)
    assert equivalence["fp8"]["1024-turbo"]["latents_rel_l2_vs_bf16_engine"] < 1e-6
    assert equivalence["service"]["1024-turbo"]["within_tolerance"] is True
    profile = result["profile_24gb"]
    assert profile["concurrent"]["statuses"] == {"200": profile["concurrent"]["requests"]}
    assert profile["denoiser"]["compile_cache"]["dir"]
    assert profile["encoder"]["precision"] == "int8"  # the file's, served as it is
    sdxl = result["sdxl"]
    for path in ("stock", "engine", "service"):
        for variant in ("base", "niannian"):
            assert sdxl[path][variant]["e2e"]["n"] == 1, (path, variant)
    assert sdxl["service"]["niannian"]["loras"] == [{"name": "niannian", "scale": 0.85}]
    assert sdxl["service"]["base"]["loras"] == []
    assert set(sdxl["ratios"]["base"]) == {"engine_over_stock", "service_over_stock"}
    assert len(sdxl["sweep"]) == 2 * 2  # guidance x steps
    for costs in (sdxl["lora"], result["zimage_lora"]):
        assert costs["adapter"]["rank"] == 4 and costs["adapter"]["modules"] > 0
        assert costs["adapter"]["mode"] == "fuse" and costs["adapter"]["host_copy_bytes"] > 0
        assert costs["miss_read_to_device"]["n"] == 6
        assert costs["hit_switch"]["n"] == 6 and costs["back_to_none"]["n"] == 3
        assert costs["step_adapter"]["p50_ms"] > 0 and costs["step_none"]["p50_ms"] > 0
    table = result_file.with_suffix(".md").read_text()
    assert "| 1024-turbo | stock |" in table and "| 1024-turbo | service |" in table
    assert "| niannian | service |" in table and "step, merged adapter" in table
