"""serve_app/engine/split_guidance.py: where the second copy goes, and that its pass runs
beside the first, not after it."""

import threading

import pytest
import torch

from serve_app.engine.split_guidance import SplitGuidance, second_device


def test_the_second_device_is_the_replicas_other_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert second_device(torch.device("cuda:0")) == torch.device("cuda:1")
    assert second_device(torch.device("cuda:1")) == torch.device("cuda:0")
    assert second_device(torch.device("cpu")) == torch.device("cpu")  # tests: a CPU copy


@pytest.mark.parametrize("visible", [0, 1])
def test_fewer_than_two_cuda_devices_are_refused(monkeypatch, visible):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(
        ValueError, match=f"needs 2 CUDA devices visible.*{visible} are.*num_gpus: 2"
    ):
        second_device(torch.device("cuda:0"))


def test_the_two_passes_run_at_the_same_time():
    """The first pass waits for the second to have started: run one after the other, the
    wait would time out."""
    split = SplitGuidance(torch.nn.Linear(2, 2), torch.device("cpu"), compile=False)
    started, threads = threading.Event(), {}

    def first():
        threads["first"] = threading.current_thread()
        assert started.wait(timeout=10), "the second pass had not started"
        return torch.zeros(1)

    def second(x):
        threads["second"] = threading.current_thread()
        started.set()
        return x + torch.is_grad_enabled()

    with torch.no_grad():
        out, other = split.run(first, second, torch.ones(1))
    assert threads["first"] is threading.current_thread()
    assert threads["second"] is not threading.current_thread()
    assert other.item() == 1.0  # the caller's grad mode (off) on the worker too


def test_a_failing_first_pass_waits_for_the_second():
    split = SplitGuidance(torch.nn.Linear(2, 2), torch.device("cpu"), compile=False)
    done = threading.Event()

    def second(x):
        done.wait(0.2)
        done.set()
        return x

    def first():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        split.run(first, second, torch.ones(1))
    assert done.is_set()
