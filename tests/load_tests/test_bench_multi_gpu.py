"""The multi-GPU benchmark (load_tests/bench_multi_gpu.py): its figures from known
numbers, and a smoke run of the whole harness on the CPU with the tiny models and three
logical GPUs. The smoke run checks what the harness writes, never how fast anything is."""

import json
import os
import subprocess
import sys

import pytest

from load_tests.bench_multi_gpu import (
    card_summary,
    encoder_limit,
    in_child,
    model_figures,
    parse_smi,
    placement_problems,
    saturated,
    scaling_efficiency,
)
from load_tests.local_service import ROOT

SMI_TEXT = """\
0, 9120, 81559, 12
1, 30211, 81559, 97
2, 1, 81559, [N/A]
"""


def test_nvidia_smi_rows_and_their_summary():
    first = parse_smi(SMI_TEXT)
    assert first[1] == {
        "index": 1,
        "memory_used_mib": 30211,
        "memory_total_mib": 81559,
        "utilization_pct": 97,
    }
    assert first[2]["utilization_pct"] is None
    second = parse_smi(SMI_TEXT.replace("30211, 81559, 97", "31000, 81559, 89"))
    summary = card_summary([first, second])
    assert [c["index"] for c in summary] == [0, 1, 2]
    card = summary[1]
    assert card["samples"] == 2
    assert card["memory_used_peak_mib"] == 31000 and card["memory_used_last_mib"] == 31000
    assert card["utilization_mean_pct"] == 93.0 and card["utilization_max_pct"] == 97
    assert summary[2]["utilization_mean_pct"] is None  # never read: not a 0
    assert card_summary([]) == []


def test_efficiency_and_saturation():
    levels = {"1": {"images_per_s": 1.0}, "4": {"images_per_s": 6.3}, "32": {"images_per_s": 6.9}}
    assert saturated(levels) == {"concurrency": 32, "images_per_s": 6.9}
    assert scaling_efficiency(1.05, 6.9, 7) == 0.939  # 6.9 / 7.35
    assert scaling_efficiency(1.05, 1.04, 1) is None  # one card: nothing scaled


def test_encoder_limit():
    e = encoder_limit(encode_ms=10.0, replicas=1, share=0.5, rate=7.0, card_busy_pct=7.0)
    assert e["requests_per_s_card_alone"] == 100.0 and e["requests_per_s_at_share"] == 50.0
    assert e["headroom_card_alone"] == 14.3 and e["headroom_at_share"] == 7.1
    assert e["requests_per_s_at_full_card"] == 100.0  # 7 requests/s at 7% busy
    assert encoder_limit(10.0, 2, 0.5, 7.0, None)["requests_per_s_card_alone"] == 200.0
    assert encoder_limit(10.0, 1, 0.5, 7.0, None)["requests_per_s_at_full_card"] is None


def test_in_child_runs_in_another_process():
    # So that this process never holds a CUDA context on card 0 (the encoders' card).
    assert in_child(os.getpid) != os.getpid()


def level(images_per_s: float, encode_ms: float = 10.0, encoder_busy: float = 5.0) -> dict:
    return {
        "images_per_s": images_per_s,
        "timings_ms": {"encode": encode_ms, "denoise": 900.0},
        "cards": [
            {"index": 1, "roles": ["Denoiser-zimage"], "utilization_mean_pct": 99.0},
            {"index": 0, "roles": ["PromptEncoder-zimage"], "utilization_mean_pct": encoder_busy},
        ],
    }


def test_model_figures_take_each_phases_saturated_level():
    phases = {
        "1": {"levels": {"1": level(0.8), "4": level(1.0), "16": level(0.99)}},
        "3": {
            "levels": {
                "4": level(2.4),
                "12": level(2.85, encode_ms=20.0, encoder_busy=12.0),
                "16": level(2.8),
            }
        },
    }
    encoder = {"num_replicas": 1, "ray_actor_options": {"num_gpus": 0.5}}
    f = model_figures(phases, "zimage", encoder)
    assert f["saturated"] == {
        "1": {"concurrency": 4, "images_per_s": 1.0},
        "3": {"concurrency": 12, "images_per_s": 2.85},
    }
    assert f["scaling_efficiency"] == 0.95
    # The encoder at the scaled phase's saturated level: 20 ms an encode, its card (not
    # a Denoiser's) 12% busy at 2.85 requests/s.
    e = f["encoder_limit"]
    assert (e["encode_ms_p50"], e["requests_per_s_card_alone"], e["gpu_share"]) == (20.0, 50.0, 0.5)
    assert (e["card_utilization_pct"], e["requests_per_s_at_full_card"]) == (12.0, 23.8)
    # One GPU: one phase, nothing scaled.
    alone = model_figures({"1": phases["1"]}, "zimage", encoder)
    assert alone["scaling_efficiency"] is None and list(alone["saturated"]) == ["1"]


def replica(*gpus: str) -> dict:
    return {"gpu_ids": list(gpus)}


@pytest.mark.parametrize(
    "placement,gpus,problem",
    [
        ({"PromptEncoder-a": [replica("0")], "Denoiser-a": [replica("1"), replica("2")]}, 3, None),
        ({"PromptEncoder-a": [replica("0")], "Denoiser-a": [replica("0")]}, 1, None),
        ({"PromptEncoder-a": [replica("0")], "Denoiser-a": [replica("1"), replica("1")]}, 3,
         "share cards"),
        ({"PromptEncoder-a": [replica("0")], "Denoiser-a": [replica("0"), replica("1")]}, 3,
         "encoders' card"),
        ({"PromptEncoder-a": [replica("0")], "PromptEncoder-b": [replica("2")],
          "Denoiser-a": [replica("1")]}, 3, "several cards"),
        ({"PromptEncoder-a": [replica("0")], "Denoiser-a": [replica("1", "2")]}, 3,
         "not one card"),
    ],
)  # fmt: skip
def test_placement_problems(placement, gpus, problem):
    problems = placement_problems(placement, gpus)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.serve  # starts real Ray Serve applications
def test_harness_smoke_run_on_three_logical_gpus(tmp_path):
    """zimage, then sdxl appended to the same file: each with its encoder on card 0 and
    one Denoiser, then two, at concurrency 1, 4, 12 (4 x 3 GPUs) and 16."""
    common = [sys.executable, "-m", "load_tests.bench_multi_gpu", "--tiny", "--gpus", "3",
              "--num-cpus", "16", "--ingress-max-replicas", "1", "--requests-per-client", "1",
              "--min-requests", "1", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run([*common, "--models", "zimage"], cwd=ROOT, check=True, timeout=600)
    subprocess.run([*common, "--models", "sdxl", "--append"], cwd=ROOT, check=True, timeout=600)
    [result_file] = tmp_path.glob("cpu-x3-*-multi-gpu.json")
    result = json.loads(result_file.read_text())
    assert result["gpus"] == 3 and result["denoiser_gpus"] == 2
    assert result["concurrency"] == [1, 4, 12, 16]
    assert not result["env"]["nvidia_smi"]
    assert set(result["models"]) == {"zimage", "sdxl"}
    for model, m in result["models"].items():
        assert m["preset"] == {"zimage": "turbo", "sdxl": "niannian"}[model]
        assert m["layout"] == [[f"PromptEncoder-{model} {0.5 if model == 'zimage' else 0.25}"],
                               [f"Denoiser-{model} 1"], [f"Denoiser-{model} 1"]]  # fmt: skip
        assert set(m["phases"]) == {"1", "2"}
        for replicas, phase in m["phases"].items():
            assert phase["denoisers"] == int(replicas)
            assert phase["placement_problems"] == []
            denoiser_cards = [r["gpu_ids"] for r in phase["placement"][f"Denoiser-{model}"]]
            assert len(denoiser_cards) == int(replicas)
            assert set(phase["levels"]) == {"1", "4", "12", "16"}
            for c, level in phase["levels"].items():
                assert level["requests"] == int(c)  # one each, as asked
                assert level["images_per_s"] > 0
                assert 0 < level["latency"]["p50_ms"] <= level["latency"]["p95_ms"]
                assert level["timings_ms"]["denoise"] > 0 and level["timings_ms"]["encode"] > 0
                assert level["cards"] == []  # no nvidia-smi here
        # The efficiency is what the two saturated levels say it is.
        one, two = m["saturated"]["1"], m["saturated"]["2"]
        assert one["images_per_s"] == max(
            lv["images_per_s"] for lv in m["phases"]["1"]["levels"].values()
        )
        assert m["scaling_efficiency"] == round(two["images_per_s"] / (2 * one["images_per_s"]), 3)
        limit = m["encoder_limit"]
        assert limit["measured_requests_per_s"] == two["images_per_s"]
        assert limit["requests_per_s_card_alone"] == round(1000 / limit["encode_ms_p50"], 1)
    assert result["scaling_efficiency"] == result["models"]["zimage"]["scaling_efficiency"]
    assert result["scaling_efficiency_model"] == "zimage"
    # The niannian preset's adapter ran on both Denoisers, every request of the phase
    # (warm-up included) on one of them.
    sdxl = result["models"]["sdxl"]["phases"]["2"]
    spread = sdxl["adapter_requests_by_replica"]
    assert len(spread) == 2 and all(n > 0 for n in spread.values()), spread
    requests = sum(level["requests"] for level in sdxl["levels"].values())
    assert sum(spread.values()) == sdxl["warmup"]["requests"] + requests
    assert set(
        result["models"]["zimage"]["phases"]["2"]["adapter_requests_by_replica"].values()
    ) == {0}
    report = result_file.with_suffix(".md").read_text()
    assert "## zimage" in report and "## sdxl" in report
    assert "| 2 | 12 | 12 |" in report


@pytest.mark.serve
def test_harness_smoke_run_on_one_logical_gpu(tmp_path):
    """One GPU: the single-GPU layout, one phase, nothing scaled."""
    subprocess.run(
        [sys.executable, "-m", "load_tests.bench_multi_gpu", "--tiny", "--gpus", "1",
         "--models", "zimage", "--num-cpus", "8", "--ingress-max-replicas", "1",
         "--requests-per-client", "1", "--min-requests", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        timeout=600,
    )  # fmt: skip
    [result_file] = tmp_path.glob("cpu-x1-*-multi-gpu.json")
    result = json.loads(result_file.read_text())
    assert result["gpus"] == 1 and result["concurrency"] == [1, 4, 16]
    assert result["scaling_efficiency"] is None
    m = result["models"]["zimage"]
    assert m["layout"] == [["PromptEncoder-zimage 0.25", "Denoiser-zimage 0.75"]]
    [phase] = m["phases"].values()
    assert phase["placement_problems"] == []
    assert [r["gpu_ids"] for reps in phase["placement"].values() for r in reps] == [["0"], ["0"]]
    assert set(phase["levels"]) == {"1", "4", "16"}
    assert all(level["images_per_s"] > 0 for level in phase["levels"].values())
    assert m["encoder_limit"]["measured_requests_per_s"] == m["saturated"]["1"]["images_per_s"]


def test_split_guidance_is_skipped_without_two_cuda_devices():
    from load_tests.bench_split_guidance import markdown, skip_reason

    assert skip_reason(2, tiny=False) is None and skip_reason(8, tiny=False) is None
    assert skip_reason(0, tiny=True) is None  # the CPU smoke run: two CPU copies
    for cuda_devices, tiny in ((1, False), (1, True), (0, False)):
        reason = skip_reason(cuda_devices, tiny)
        assert reason == f"split guidance needs 2 CUDA devices; {cuda_devices} visible here"
    section = {"request": {"width": 1024, "height": 1024, "steps": 9, "guidance": 5.0},
               "skipped": skip_reason(1, False)}  # fmt: skip
    assert markdown(section)[-1] == "Skipped: split guidance needs 2 CUDA devices; 1 visible here."


def test_split_guidance_phase_smoke_run_on_the_cpu(tmp_path):
    """--split-guidance with the tiny model, in this process: both engines on the CPU (the
    split one's second copy a CPU copy), what the results file says of them, and the
    split image equal to the one-device image within float32 roundings."""
    from load_tests.bench_multi_gpu import main

    main(["--split-guidance", "--tiny", "--gpus", "2", "--runs", "2", "--out", str(tmp_path)])
    [result_file] = tmp_path.glob("cpu-x2-*-multi-gpu.json")
    result = json.loads(result_file.read_text())
    assert result["models"] == {} and result["scaling_efficiency"] is None
    split = result["split_guidance"]
    assert split["skipped"] is None and split["request"]["guidance"] == 5.0
    assert split["one_gpu"]["devices"] == ["cpu"] and split["split"]["devices"] == ["cpu", "cpu"]
    for name in ("one_gpu", "split"):
        latency = split[name]["latency"]
        assert latency["n"] == 2 and 0 < latency["p50_ms"] <= latency["p95_ms"]
        assert split[name]["step_ms_p50"] > 0
    ratio = split["split"]["latency"]["p50_ms"] / split["one_gpu"]["latency"]["p50_ms"]
    assert split["ratio_p50"] == round(ratio, 3)
    assert split["meets_target"] == (split["ratio_p50"] <= 0.6)
    eq = split["equivalence"]
    assert eq["latents_rel_l2"] <= 1e-5 and eq["max_abs"] <= 1
    report = result_file.with_suffix(".md").read_text()
    assert "## Split guidance: Z-Image 256x256, 2 steps, guidance 5.0" in report
    assert f"Split / one GPU: p50 {split['ratio_p50']}x" in report
