import pytest
import yaml

from deploy import scale_to_zero


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
