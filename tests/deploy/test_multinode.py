"""deploy/serve_config.multi_gpu.yaml on Ray's multi-node test cluster
(ray.cluster_utils.Cluster): nodes that declare GPUs they do not have, the tiny models
on the CPU. Where replicas land, a denoiser scaling onto a node added later, and that
node lost under load."""

import concurrent.futures
import json
import threading

import httpx
import pytest

from load_tests.local_service import ROOT, local_service
from tests.serve.conftest import wait_for

MULTI = ROOT / "deploy" / "serve_config.multi_gpu.yaml"
PATH = "/v1/images/generations"
PROGRESS = "event: image_generation.progress"
LONG = {"prompt": "a long one", "size": "512x512", "num_inference_steps": 80}
MODELS = [
    {"id": "zimage", "model": "tiny", "lora_dir": None, "warmup_sizes": []},
    {"id": "sdxl", "model": "tiny-sdxl", "lora_dir": None, "warmup_sizes": []},
]
# The file's deployments, with the zimage denoiser's autoscaling quick to react (the
# file waits 10 s on an upscale), at most one replica per GPU node here; one Ingress.
DEPLOYMENTS = {
    "Denoiser-zimage": {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 600,
            "look_back_period_s": 2,
        }
    },
}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "num_gpus": 0, "include_dashboard": False},
    )
    # One GPU node of three cards: the encoders on fractions of one, a denoiser per model
    # on each of the others, as the file lays an 8-GPU node out.
    cluster.gpu_node = cluster.add_node(num_cpus=8, num_gpus=3)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    with local_service(
        tmp_path_factory.mktemp("multinode"),
        MODELS,
        num_gpus=0,
        ingress_max_replicas=1,
        ready_timeout_s=300,
        deployments=DEPLOYMENTS,
        source=MULTI,
        address=cluster.address,
        args={"api_keys": None},
        # Every node here is this machine: their proxies would share one port, and a
        # client's connection through the lost node's proxy would end with it (as it
        # does behind a load balancer; docs/scaling.md). The head's proxy alone here.
        top_level={"proxy_location": "HeadOnly"},
    ) as svc:
        yield svc


def replicas(service, deployment: str, model: str, expect: int) -> dict[str, dict]:
    """describe() of each of a deployment's `expect` replicas, by replica id (asked
    until each has answered: a handle call goes to any one)."""
    handle = service.handle(deployment, model)
    seen: dict[str, dict] = {}

    def all_seen():
        for d in [handle.describe.remote() for _ in range(4)]:
            info = d.result()
            seen[info["replica"]] = info
        return len(seen) >= expect

    wait_for(all_seen, timeout=60, why=lambda: f"{expect} replicas of {deployment}-{model}: {seen}")
    return seen


def running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications["t2i"]
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def stream(url: str, started: threading.Semaphore | None = None) -> str:
    """A long streamed zimage request to its end: "completed", or the error event's code.
    `started` is released at the first progress event (a denoiser is drawing it)."""
    lines = []
    with httpx.Client(base_url=url, timeout=180) as http:
        body = {**LONG, "model": "zimage", "stream": True}
        with http.stream("POST", PATH, json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                first = PROGRESS not in lines
                if started and line == PROGRESS and first:
                    started.release()
                lines.append(line)
    if "event: image_generation.completed" in lines:
        return "completed"
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    return error["error"]["code"]


def test_placement_scale_out_and_node_loss(cluster, service):
    gpu_node = cluster.gpu_node.node_id

    # Placement: both encoders on one card of the GPU node, each denoiser on a card of
    # its own, none of them the encoders'.
    encoders = [
        next(iter(replicas(service, "PromptEncoder", m, 1).values())) for m in ("zimage", "sdxl")
    ]
    denoisers = [
        next(iter(replicas(service, "Denoiser", m, 1).values())) for m in ("zimage", "sdxl")
    ]
    assert {r["node"] for r in encoders + denoisers} == {gpu_node}
    assert encoders[0]["gpu_ids"] == encoders[1]["gpu_ids"] and len(encoders[0]["gpu_ids"]) == 1
    cards = [d["gpu_ids"][0] for d in denoisers]
    assert len(set(cards)) == 2 and encoders[0]["gpu_ids"][0] not in cards, (encoders, denoisers)

    # Scale-out: with no card left, a new node lets the zimage denoiser grow onto it.
    new_node = cluster.add_node(num_cpus=4, num_gpus=1)
    cluster.wait_for_nodes()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        load = [pool.submit(stream, service.url) for _ in range(3)]
        wait_for(lambda: running("Denoiser-zimage") == 2, timeout=120, why=lambda: "no upscale")
        [f.result() for f in load]
    zimage = replicas(service, "Denoiser", "zimage", 2)
    nodes = {r["node"] for r in zimage.values()}
    assert nodes == {gpu_node, new_node.node_id}, zimage

    # Node loss: streams under way on both replicas; the new node goes. Each stream
    # completes or ends with a clean error event; requests after it are served.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = threading.Semaphore(0)
        load = [pool.submit(stream, service.url, started) for _ in range(4)]
        # A replica draws one request at a time: two drawing at once are one on each.
        for _ in range(2):
            assert started.acquire(timeout=60), "two streams did not start drawing"
        cluster.remove_node(new_node, allow_graceful=False)
        ends = [f.result() for f in load]
    assert set(ends) <= {"completed", "replica_failed"}, ends
    assert "replica_failed" in ends and "completed" in ends, ends
    with httpx.Client(base_url=service.url, timeout=120) as http:
        for model in ("zimage", "sdxl"):
            r = http.post(PATH, json={"prompt": "after", "model": model, "size": "256x256"})
            assert r.status_code == 200, r.text
