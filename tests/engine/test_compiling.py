"""The persistent compile cache: a second process started with the same folder loads
what the first compiled, and draws the same pixels."""

import json
import subprocess
import sys

import numpy as np

# One compiled Z-Image request in a fresh process: its compile-cache counters and image.
DRAW = """
import json, sys
import numpy as np
from pathlib import Path
from serve_app.engine import load_denoiser, load_encoder
from serve_app.engine.compiling import compile_cache_stats
from serve_app.messages import GenerationParams

folder, out = Path(sys.argv[1]), sys.argv[2]
den = load_denoiser("tiny", "cpu", "float32", compile=True, compile_cache=folder)
p = GenerationParams("a red fox in the snow", None, 256, 256, 2, 0.0, 4)
emb = load_encoder("tiny", "cpu", "float32").encode_params(p)
np.save(out, den.generate(p, emb)[0])
print(json.dumps(compile_cache_stats()))
"""


def draw(folder, out) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", DRAW, str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cached_start_loads_every_graph_and_draws_the_same_pixels(tmp_path):
    folder = tmp_path / "compile"
    cold = draw(folder, tmp_path / "cold.npy")
    assert cold["compiled"] > 0 and cold["loaded"] == 0, cold
    assert any(folder.iterdir()), "nothing was written to the cache folder"
    warm = draw(folder, tmp_path / "warm.npy")
    assert warm == {"loaded": cold["compiled"], "compiled": 0}, (cold, warm)
    assert np.array_equal(np.load(tmp_path / "cold.npy"), np.load(tmp_path / "warm.npy"))
