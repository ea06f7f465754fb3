import copy
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.check import check, main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIGS = sorted(DEPLOY.glob("serve_config*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes(path):
    assert check(yaml.safe_load(path.read_text())) == []


def test_both_layouts_are_shipped():
    assert {p.name for p in CONFIGS} >= {"serve_config.yaml", "serve_config.multi_gpu.yaml"}


def misspelt(where):
    config = load("serve_config.multi_gpu.yaml")
    where(config)
    return config


TYPOS = {
    "deployment": (
        lambda c: deployment(c, "Denoiser-zimage").update(max_ongoing_requst=4),
        "applications[t2i].deployments[Denoiser-zimage].max_ongoing_requst",
    ),
    "autoscaling": (
        lambda c: deployment(c, "Denoiser-sdxl")["autoscaling_config"].update(max_replica=9),
        "autoscaling_config.max_replica",
    ),
    "actor options": (
        lambda c: deployment(c, "Ingress")["ray_actor_options"].update(num_gpu=1),
        "ray_actor_options.num_gpu",
    ),
    "http options": (
        lambda c: c["http_options"].update(keep_alive_timeout=90),
        "http_options.keep_alive_timeout",
    ),
    "top level": (lambda c: c.update(proxy_locaton="EveryNode"), "unknown key proxy_locaton"),
    "model setting": (
        lambda c: c["applications"][0]["args"]["models"][1].update(lora_dri="/x"),
        "lora_dri",
    ),
    "app setting": (
        lambda c: c["applications"][0]["args"].update(request_timeout=1),
        "request_timeout",
    ),
    "deployment name": (
        lambda c: c["applications"][0]["deployments"].append({"name": "Denoiser-zimag"}),
        "deployment 'Denoiser-zimag' is none of the app's",
    ),
}


@pytest.mark.parametrize("kind", TYPOS)
def test_a_typo_anywhere_fails(kind):
    where, named = TYPOS[kind]
    problems = check(misspelt(where))
    assert len(problems) == 1 and named in problems[0], problems


def test_ray_alone_lets_a_misspelt_deployment_key_through():
    # Why the check exists: Ray's schema ignores what it does not know.
    config = misspelt(TYPOS["deployment"][0])
    ServeDeploySchema.model_validate(config)
    assert check(config)


def test_a_model_without_its_deployments_configured_fails():
    config = load("serve_config.yaml")
    app = config["applications"][0]
    app["args"]["models"].append(copy.deepcopy(app["args"]["models"][0]) | {"id": "third"})
    problems = check(config)
    assert [p for p in problems if "'Denoiser-third' is not configured" in p], problems


def test_the_command_line_fails_on_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(misspelt(TYPOS["autoscaling"][0])))
    assert main([str(DEPLOY / "serve_config.yaml"), str(bad)]) == 1
    out = capsys.readouterr()
    assert "serve_config.yaml: ok" in out.out and "bad.yaml: FAILED" in out.out
    assert "max_replica" in out.err


def test_the_24gb_profile_keeps_3_gib_of_its_card_spare_and_admits_1024():
    """Its text encoder has int8 weights, it serves no adapters, and its replicas' caps
    with two CUDA contexts (about 0.5 GiB each; the GPU bench reads the real figure)
    leave 3 GiB; the ingress's prediction for 1024x1024, with the 12.9 GB its Denoiser
    held after the warm-up on an H100 (*perf-5a*), is within the Denoiser's budget."""
    from serve_app.config import AppConfig
    from serve_app.messages import GenerationParams
    from serve_app.vram import predict

    args = load("serve_config.24gb.yaml")["applications"][0]["args"]
    [model] = AppConfig.model_validate(args).models
    assert model.encoder_precision == "int8" and model.options == {}
    assert model.lora_dir is None and model.warmup_sizes == ["1024x1024"]
    memory = model.memory
    assert memory.encoder_cap_bytes + memory.cap_bytes + 2 * 2**29 <= (24 - 3) * 2**30
    for guided in (False, True):
        params = GenerationParams("x", None, 1024, 1024, 9, 5.0 if guided else 0.0, 0)
        needed = predict("zimage", params, guided, resident_bytes=12_901_679_104)
        assert needed <= memory.cap_bytes - memory.reserve_bytes


@pytest.mark.parametrize("gpus", [None, 1, 0.75, 2])
def test_a_split_guidance_denoiser_must_ask_for_two_gpus(gpus):
    """Split guidance keeps a second copy of the transformer on the replica's second card."""
    config = load("serve_config.multi_gpu.yaml")
    config["applications"][0]["args"]["models"][0]["options"] = {"split_guidance": True}
    options = deployment(config, "Denoiser-zimage")["ray_actor_options"]
    options.pop("num_gpus")
    if gpus is not None:
        options["num_gpus"] = gpus
    problems = check(config)
    if gpus == 2:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert "model 'zimage' has options.split_guidance" in problems[0]
        assert "Denoiser-zimage needs ray_actor_options.num_gpus: 2 (" in problems[0]
        assert problems[0].endswith(f"not {gpus}")


def test_split_guidance_off_asks_nothing_of_the_gpus():
    config = load("serve_config.multi_gpu.yaml")
    config["applications"][0]["args"]["models"][0]["options"] = {"split_guidance": False}
    assert check(config) == []
