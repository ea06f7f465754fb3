"""Fit the request-memory predictor (serve_app/vram.py) to a load_tests/measure_vram.py
run and write its coefficients to serve_app/data/vram.json.

    python -m load_tests.fit_vram load_tests/results/<gpu>-<date>-vram.json

Least squares with non-negative coefficients over each family's measured cases (a
feature whose coefficient comes out negative is dropped and the rest refitted); the
data file keeps the source run, each case's error and the worst one.
"""

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "serve_app" / "data" / "vram.json"
NAMES = ("base", "per_pixel", "per_latent_pixel", "per_image_pixel", "adapter")


def features(case: dict) -> list[float]:
    pixels, images = case["side"] ** 2, case["images"]
    batch = images * (2 if case["guided"] else 1)
    return [1.0, pixels, pixels * batch, pixels * images, 1.0 if case["adapter"] else 0.0]


def nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    keep = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        negative = [i for i in keep if coef[i] < 0]
        if not negative:
            return coef
        keep.remove(min(negative, key=lambda i: coef[i]))


def fit_family(cases: list[dict]) -> dict:
    measured = [c for c in cases if "extra_bytes" in c]
    x = np.array([features(c) for c in measured])
    y = np.array([c["extra_bytes"] for c in measured], dtype=float)
    coef = nonnegative_fit(x, y)
    predicted = x @ coef
    errors = (predicted - y) / y
    return {
        "coefficients": {
            **{name: float(v) for name, v in zip(NAMES, coef, strict=True)},
            "max_error": float(np.abs(errors).max()),
        },
        "cases": [
            {
                **{k: c[k] for k in ("side", "images", "guided", "adapter")},
                "measured_bytes": c["extra_bytes"],
                "predicted_bytes": int(p),
                "error": round(float(e), 4),
            }
            for c, p, e in zip(measured, predicted, errors, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path, help="a measure_vram.py output file")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    run = json.loads(args.run.read_text())
    out = {
        "source": str(args.run.relative_to(ROOT) if args.run.is_absolute() else args.run),
        "gpu": run["env"]["gpu"],
        "families": {f: fit_family(r["cases"]) for f, r in run["families"].items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for family, f in out["families"].items():
        print(family, f["coefficients"])


if __name__ == "__main__":
    main()
