"""A model whose Denoiser scales to zero (the idle app, conftest.IDLE; in production
deploy/serve_config.scale_to_zero.yaml): probes and listings leave it asleep, a
generation request wakes it and is answered, and it goes back to zero after."""

import time

import httpx
import pytest
import ray

from serve_app.inflight import LIVE_REFRESH_S, replica_prefix
from tests.serve.conftest import IDLE, wait_for

pytestmark = pytest.mark.serve

SMALL = {"prompt": "a small one", "size": "256x256", "num_inference_steps": 2}
PATH = "/v1/images/generations"


def denoisers() -> int:
    """Replica actors of the idle app's Denoiser, alive or starting."""
    prefix = replica_prefix("idle", "Denoiser-zimage")
    return sum(
        a["name"].startswith(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
    )


def readiness(http: httpx.Client) -> dict:
    r = http.get("/readyz")
    assert r.status_code == 200, r.text
    return r.json()["models"]["zimage"]


def test_an_idle_model_sleeps_through_probes_and_wakes_for_a_request(service):
    with httpx.Client(base_url=service.url + IDLE, timeout=120) as http:
        assert denoisers() == 0  # initial_replicas: 0
        for _ in range(3):  # what a load balancer's probe does, every second
            assert readiness(http)["status"] == "idle"
            time.sleep(1)
        assert denoisers() == 0

        # Never seen and asleep: the request waits for a replica to load and warm up.
        started = time.monotonic()
        r = http.post(PATH, json=SMALL)
        cold_s = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        assert denoisers() == 1  # the count below sees this app's replica
        assert readiness(http)["status"] == "ready"
        listed = http.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["zimage"]

        # Back to zero after its last request; the ingress keeps the facts it learnt and
        # the next request wakes the Denoiser through the generation itself.
        wait_for(lambda: denoisers() == 0, timeout=90, every=1)
        time.sleep(LIVE_REFRESH_S + 0.5)  # InFlight's count of live replicas catches up
        assert readiness(http)["status"] == "idle"
        assert http.get("/v1/models").json()["data"] == listed  # from what it knows
        assert denoisers() == 0
        started = time.monotonic()
        r = http.post(PATH, json=SMALL)
        warm_again_s = time.monotonic() - started
        assert r.status_code == 200, r.text
    print(f"woken from zero: {cold_s:.1f} s never seen, {warm_again_s:.1f} s seen before")
