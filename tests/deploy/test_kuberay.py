import copy
import json
import math
import re

import jsonschema
import pytest
import yaml

from deploy.kuberay import render
from deploy.kuberay.render import DASHBOARD, OUT, ROOT, SERVE_CONFIG

CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"


def strict(schema):
    """The CRD's schema with unknown keys refused wherever it lists the known ones (it
    says nothing, so a misspelt key would pass), except where Kubernetes keeps unknown
    fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    if not CRD.exists():
        pytest.fail(f"the KubeRay v1.7.0 RayService CRD is not at {CRD}")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def docs():
    return list(yaml.safe_load_all(OUT.read_text()))


def kind(docs, k):
    return [d for d in docs if d["kind"] == k]


def test_the_manifest_is_rendered_from_its_sources():
    assert OUT.read_text() == render.render(), "stale: python -m deploy.kuberay.render"


def test_the_rayservice_passes_the_crd_strictly(validator, docs):
    (service,) = kind(docs, "RayService")
    errors = [e.message for e in validator.iter_errors(service)]
    assert errors == []


def test_a_misspelt_key_fails_the_strict_crd(validator, docs):
    (service,) = kind(docs, "RayService")
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e.message for e in validator.iter_errors(bad))
    bad = copy.deepcopy(service)
    container = bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    container["containers"][0]["resource"] = {}
    assert any("resource" in e.message for e in validator.iter_errors(bad))


def test_serve_config_is_the_multi_gpu_file(docs):
    (service,) = kind(docs, "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert embedded["applications"] == config["applications"]
    assert embedded == config


def test_the_gpu_workers_hold_what_the_config_can_scale_to(docs):
    (service,) = kind(docs, "RayService")
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus_per_node = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    at_most = 0.0
    for d in config["applications"][0]["deployments"]:
        replicas = d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1))
        at_most += replicas * d.get("ray_actor_options", {}).get("num_gpus", 0)
    # Every card used at full scale, none short.
    assert math.ceil(at_most) == gpus_per_node * group["maxReplicas"]
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/etc/t2i"]["readOnly"]
    models = config["applications"][0]["args"]["models"]
    assert all(m["model"].startswith("/models/") for m in models)
    keys = config["applications"][0]["args"]["api_keys"]
    assert keys["file"].startswith("/etc/t2i/")
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}


def test_pod_monitors_scrape_named_ports_of_head_and_workers(docs):
    (service,) = kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    ports = {
        "head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"],
        "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"],
    }
    monitors = kind(docs, "PodMonitor")
    assert len(monitors) == 2 and not kind(docs, "ServiceMonitor")
    for monitor in monitors:
        node_type = monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        named = {p["name"]: p["containerPort"] for p in ports[node_type]}
        scraped = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
        assert "metrics" in scraped and set(scraped) <= set(named), (node_type, scraped)
        assert named["metrics"] == 8080  # Ray's metrics export port


def test_the_dashboard_configmap_is_the_dashboard(docs):
    labelled = [d for d in kind(docs, "ConfigMap") if d["metadata"].get("labels")]
    (cm,) = [d for d in labelled if "grafana_dashboard" in d["metadata"]["labels"]]
    assert json.loads(cm["data"]["t2i.json"]) == json.loads(DASHBOARD.read_text())


def test_the_front_proxy_strips_ray_headers_and_sends_to_the_serve_service(docs):
    (cm,) = [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"] == "t2i-nginx"]
    conf = cm["data"]["t2i.conf"]
    assert "server t2i-serve-svc:8000;" in conf and "127.0.0.1:8000" not in conf
    for header in ("x-request-disconnect-disabled", "x-request-timeout-seconds"):
        assert f'proxy_set_header {header} "";' in conf
    # Each model shed past what its Denoisers take in at most: requests_per_replica 4 x
    # max_replicas (5 for zimage, 2 for sdxl in deploy/serve_config.multi_gpu.yaml).
    shed = re.findall(r"limit_conn t2i_shed_(\w+) (\d+);", conf)
    assert shed == [("zimage", "20"), ("sdxl", "8")]
    (lb,) = kind(docs, "Service")
    (front,) = kind(docs, "Deployment")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["selector"] == front["spec"]["template"]["metadata"]["labels"]
