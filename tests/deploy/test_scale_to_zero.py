import pytest
import yaml

from deploy import scale_to_zero
from load_tests.local_service import local_service


def test_the_variant_is_generated_from_the_multi_gpu_config():
    assert scale_to_zero.OUT.read_text() == scale_to_zero.render(), (
        "stale: python -m deploy.scale_to_zero"
    )


def test_only_the_denoisers_may_scale_to_zero():
    def deployments(path):
        app = yaml.safe_load(path.read_text())["applications"][0]
        return {d["name"]: d for d in app["deployments"]}

    source, variant = deployments(scale_to_zero.SOURCE), deployments(scale_to_zero.OUT)
    assert source.keys() == variant.keys()
    for name, d in variant.items():
        autoscaling = d.get("autoscaling_config", {})
        if name.startswith("Denoiser-"):
            assert autoscaling["min_replicas"] == 0 and autoscaling["initial_replicas"] == 1
            assert autoscaling["downscale_to_zero_delay_s"] > 0
            rest = {k: v for k, v in d.items() if k != "autoscaling_config"}
            assert rest == {k: v for k, v in source[name].items() if k != "autoscaling_config"}
        else:
            assert d == source[name], name


def test_a_source_without_denoiser_autoscaling_fails(tmp_path, monkeypatch):
    text = scale_to_zero.SOURCE.read_text().replace("min_replicas: 1", "min_replicas: 2")
    monkeypatch.setattr(scale_to_zero, "SOURCE", tmp_path / "x.yaml")
    scale_to_zero.SOURCE.write_text(text)
    with pytest.raises(ValueError, match="min_replicas: 1 to change"):
        scale_to_zero.render()


def test_the_variant_deploys_with_one_denoiser_per_model_and_serves(tmp_path):
    """The file as written but for the models (tiny, on the CPU) and API keys (off), on
    three logical GPUs: each Denoiser starts with its initial replica, and both models
    draw. Its going to zero and waking: tests/serve/test_scale_to_zero.py."""
    from ray import serve

    models = [
        {"id": "zimage", "model": "tiny", "lora_dir": None, "warmup_sizes": []},
        {"id": "sdxl", "model": "tiny-sdxl", "lora_dir": None, "warmup_sizes": []},
    ]
    with local_service(tmp_path, models, num_gpus=3, num_cpus=12, ingress_max_replicas=1,
                       source=scale_to_zero.OUT, args={"api_keys": None}) as svc:  # fmt: skip
        deployments = serve.status().applications["t2i"].deployments
        with svc.client(timeout=120) as http:
            ready = http.get("/readyz").json()
            for model in ("zimage", "sdxl"):
                assert deployments[f"Denoiser-{model}"].replica_states == {"RUNNING": 1}
                assert ready["models"][model]["status"] == "ready", ready
                body = {
                    "prompt": "a small one",
                    "size": "256x256",
                    "num_inference_steps": 2,
                    "model": model,
                }
                assert http.post("/v1/images/generations", json=body).status_code == 200
