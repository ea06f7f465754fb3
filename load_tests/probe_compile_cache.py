"""Does the persistent compile cache (`compile_cache_dir`) load across processes on this
machine, and where not, why: one compiled Z-Image request in a fresh process, twice, on
one cache folder; each process's cache counters and the FX graph cache's entries after
it, and for every graph the second compiled again, the lines of inductor's cache-key
details that differ from the first process's.

On the CPU (torch 2.13) the second process loads every graph (tests/engine/
test_compiling.py runs this module's `draw`). On an H100 host (torch 2.11, full-size
model, *perf-1*/*-2*) a second process loaded none of the 8: this finds out why.

    python -m load_tests.probe_compile_cache --device cuda --out $OUT
"""

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from load_tests.local_service import ROOT

# One compiled Z-Image request in a fresh process: its compile-cache counters (stdout's
# last line), its image (argv[3]), and inductor's cache-key details for each graph
# (argv[4]), which torch logs at DEBUG as "FX graph cache hash details for key ...".
DRAW = """
import json, logging, sys
import numpy as np
from pathlib import Path
from serve_app.engine import load_denoiser, load_encoder
from serve_app.engine.compiling import compile_cache_stats
from serve_app.messages import GenerationParams

model, device, folder, out, details = sys.argv[1:6]
size, warmup = int(sys.argv[6]), sys.argv[7] == "warmup"
handler = logging.FileHandler(details)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("torch._inductor.codecache")
log.setLevel(logging.DEBUG)
log.addHandler(handler)
den = load_denoiser(model, device, "auto", compile=True, compile_cache=Path(folder))
p = GenerationParams("a red fox in the snow", None, size, size, 2, 0.0, 4)
enc = load_encoder(model, device, "auto")
if warmup:  # as a replica starts: every path a request can take, at this size
    enc.warmup()
    den.warmup([(size, size)])
emb = enc.encode_params(p)
np.save(out, den.generate(p, emb)[0])
from torch._dynamo.utils import counters
print(json.dumps({**compile_cache_stats(), "counters": {
    k: dict(counters[k]) for k in ("inductor", "aot_autograd") if k in counters}}))
"""
KEY_LINE = "FX graph cache hash details for key "


def draw(folder: Path, out: Path, device: str = "cpu", model: str = "tiny", size: int = 256,
         details: Path | None = None, warmup: bool = False) -> dict:  # fmt: skip
    """Run DRAW in a fresh process; its counters {"loaded", "compiled", "counters"}.
    `warmup`: warm the engine up first as a replica does (every guidance and mask path)."""
    details = details or out.with_suffix(".keys.log")
    done = subprocess.run(
        [sys.executable, "-c", DRAW, model, device, str(folder), str(out), str(details),
         str(size), "warmup" if warmup else "request"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def key_details(log: Path) -> list[tuple[str, list[str]]]:
    """(key, its detail lines) per graph, in the order the process computed them."""
    graphs: list[tuple[str, list[str]]] = []
    for line in log.read_text().splitlines():
        if line.startswith(KEY_LINE):
            graphs.append((line[len(KEY_LINE) :].rstrip(":"), []))
        elif graphs:
            graphs[-1][1].append(line)
    return graphs


def differences(first: Path, second: Path, context: int = 0) -> list[dict]:
    """For each graph whose key differs between the two processes (paired in order),
    the unified diff of its detail lines."""
    found = []
    pairs = zip(key_details(first), key_details(second), strict=False)
    for i, ((key_a, lines_a), (key_b, lines_b)) in enumerate(pairs):
        if key_a != key_b:
            diff = difflib.unified_diff(lines_a, lines_b, "first", "second", n=context, lineterm="")
            found.append({"graph": i, "keys": [key_a, key_b], "diff": list(diff)[2:]})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="tiny", help="tiny, or a checkpoint folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", action="store_true", help="warm up as a replica first")
    parser.add_argument("--out", type=Path, help="where to write (default: a new temp folder)")
    args = parser.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="cc-probe-"))
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / "compile"
    runs = {}
    for name in ("first", "second"):
        runs[name] = draw(folder, args.out / f"{name}.npy", args.device, args.model,
                          args.size, args.out / f"{name}.keys.log", args.warmup)  # fmt: skip
        # Entries in inductor's FX graph cache: none after the first run means the
        # misses are entries never written, not other keys.
        runs[name]["fxgraph_entries"] = sum(
            1 for p in (folder / "fxgraph").rglob("*") if p.is_file()
        )
        print(name, runs[name], flush=True)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "differences": differences(args.out / "first.keys.log", args.out / "second.keys.log"),
    }
    (args.out / "probe-compile-cache.json").write_text(json.dumps(report, indent=1))
    for d in report["differences"][:3]:
        print(f"graph {d['graph']}:", *d["diff"][:40], sep="\n  ")
    print("wrote", args.out / "probe-compile-cache.json")


if __name__ == "__main__":
    main()
