"""Where a Denoiser's load time goes, and whether reading the transformer straight onto
the GPU (diffusers' `device_map`, through accelerate) beats reading it into host memory
and copying it over, as `Denoiser.from_pretrained` does. Each way is timed twice, in
turn, on a checkpoint already in the page cache; one JSON line per measurement.

    python -m load_tests.probe_load --model /tmp/zimage-full-random --out $OUT
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    began = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - began, 3), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.cuda.init()
    kwargs = {"subfolder": "transformer", "torch_dtype": torch.bfloat16, "local_files_only": True}
    rows = []
    for attempt in range(2):
        read_s, model = timed(
            lambda: ZImageTransformer2DModel.from_pretrained(args.model, **kwargs)
        )
        copy_s, model = timed(lambda m=model: m.to("cuda"))
        rows.append({"way": "host, then copy", "attempt": attempt, "read_s": read_s,
                     "copy_s": copy_s, "total_s": round(read_s + copy_s, 3)})  # fmt: skip
        del model
        gc.collect()
        torch.cuda.empty_cache()
        total_s, model = timed(
            lambda: ZImageTransformer2DModel.from_pretrained(
                args.model, device_map={"": "cuda"}, **kwargs
            )
        )
        rows.append({"way": "device_map cuda", "attempt": attempt, "total_s": total_s,
                     "on": str(next(model.parameters()).device)})  # fmt: skip
        del model
        gc.collect()
        torch.cuda.empty_cache()
    vae_s, _ = timed(
        lambda: AutoencoderKL.from_pretrained(
            args.model, subfolder="vae", torch_dtype=torch.bfloat16, local_files_only=True
        ).to("cuda")
    )
    rows.append({"way": "vae, host then copy", "total_s": vae_s})
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "checkpoint": str(args.model),
        "rows": rows,
    }
    (args.out / "probe-load.json").write_text(json.dumps(out, indent=1))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
