"""The persistent compile cache: a second process started with the same folder loads
what the first compiled, and draws the same pixels (load_tests/probe_compile_cache.py's
`draw`, which also records inductor's cache-key details for each graph)."""

import numpy as np

from load_tests.probe_compile_cache import differences, draw


def test_a_cached_start_loads_every_graph_and_draws_the_same_pixels(tmp_path):
    folder = tmp_path / "compile"
    cold = draw(folder, tmp_path / "cold.npy")
    assert cold["compiled"] > 0 and cold["loaded"] == 0, cold
    assert any(folder.iterdir()), "nothing was written to the cache folder"
    warm = draw(folder, tmp_path / "warm.npy")
    assert (warm["loaded"], warm["compiled"]) == (cold["compiled"], 0), (cold, warm)
    assert warm["counters"]["inductor"]["fxgraph_cache_hit"] == cold["compiled"]
    assert np.array_equal(np.load(tmp_path / "cold.npy"), np.load(tmp_path / "warm.npy"))
    # Both processes computed the same key for every graph, and logged how.
    assert differences(tmp_path / "cold.keys.log", tmp_path / "warm.keys.log") == []
    assert (tmp_path / "cold.keys.log").read_text().count("FX graph cache hash details") > 0


def test_fitting_the_preview_map_compiles_nothing():
    """The preview's fit decodes a batch of 4 small latents; through the compiled VAE
    decoder that was a graph of its own (a batch of 1 is specialised), which no request
    uses: 41 s of an H100 replica's cold start (*perf-6*)."""
    from serve_app.engine import load_denoiser
    from serve_app.engine.compiling import compile_cache_stats

    den = load_denoiser("tiny", "cpu", "auto", compile=True)
    before = compile_cache_stats()
    den.fit_preview()
    assert compile_cache_stats() == before
