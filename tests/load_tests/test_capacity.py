import json
import math

import pytest

from load_tests.capacity import erlang_c, latency_quantile, measured, replicas_for, table
from load_tests.local_service import ROOT

BENCH = ROOT / "load_tests" / "results" / "NVIDIA-H200-2026-11-26-bench-7.json"


def test_erlang_c_matches_the_textbook():
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at half load
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(3, 3.0) == 1.0  # cannot keep up


def test_one_replica_is_the_m_m_1_queue():
    # P(wait > t) = rho exp(-(mu - lambda) t): the 95th percentile wait is ln(10) / 0.5.
    assert latency_quantile(0.5, 1, 1.0, 1.0, 0.95) == pytest.approx(1.0 + math.log(10) / 0.5)
    assert latency_quantile(1.0, 1, 1.0, 1.0, 0.95) == math.inf


def test_replica_counts_grow_with_rate_and_shrink_with_the_target():
    counts = [replicas_for(rate, 5.0, 1.0, 1.0) for rate in (1, 10, 100)]
    assert counts == sorted(counts) and counts[-1] >= 100
    assert replicas_for(10, 2.0, 1.0, 1.0) >= replicas_for(10, 10.0, 1.0, 1.0)
    assert replicas_for(1, 0.5, 1.0, 1.0) is None  # below one generation's time
    assert replicas_for(0.01, 5.0, 1.0, 1.0) == 1


def test_figures_come_from_the_bench_file():
    service_s, per_replica = measured(json.loads(BENCH.read_text()), "1024-turbo")
    assert (service_s, per_replica) == (pytest.approx(1.01069), pytest.approx(1.049))


def test_the_scaling_doc_shows_what_the_model_gives():
    service_s, per_replica = measured(json.loads(BENCH.read_text()), "1024-turbo")
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert table(service_s, per_replica, [1, 5, 10, 25, 50, 100, 200], [2, 5, 10]) in doc
    assert table(2.281, 0.438, [1, 5, 10, 25, 50, 100, 200], [5, 10, 30]) in doc
