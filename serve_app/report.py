"""A stage-by-stage latency and VRAM-peak report of a running service, over HTTP only.

    python -m serve_app.report --url http://127.0.0.1:8000 \\
        [--config 1024x1024[:STEPS[:GUIDANCE]] ...] [--runs 3] [--warmup 1] [--out FILE]

Each configuration is POSTed to /v1/images/generations `--warmup` + `--runs` times; the
table shows, per stage, the median of the answers' `timings` (ms) over the runs and the
largest of their `vram` peaks. Without `--config`: 768², 1024² and 1280² at the served
model's default preset. An error answer (e.g. 413, the image does not fit in GPU memory)
becomes a row that says so. `--out` writes the table as markdown (.md) or JSON (.json).

It imports no torch (nor anything of the service's engine), so it runs from any machine
that can reach the service.
"""

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STAGES = (
    "encode",
    "encode_transfer",
    "queue",
    "adapters",
    "denoise",
    "decode",
    "result_transfer",
    "encode_image",
    "e2e",
)
DEFAULT_SIZES = ((768, 768), (1024, 1024), (1280, 1280))
_CONFIG = re.compile(r"^(\d+)x(\d+)(?::(\d+))?(?::(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Config:
    """One configuration to measure; steps and guidance None mean the default preset's."""

    width: int
    height: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Config":
        """Parse "WxH", "WxH:STEPS" or "WxH:STEPS:GUIDANCE", e.g. "1280x768:20:3.5"."""
        match = _CONFIG.match(text)
        if not match:
            raise argparse.ArgumentTypeError(
                f"config {text!r} is not WIDTHxHEIGHT[:STEPS[:GUIDANCE]], e.g. 1024x1024:9:0"
            )
        width, height, steps, guidance = match.groups()
        return cls(
            int(width),
            int(height),
            int(steps) if steps else None,
            float(guidance) if guidance else None,
        )

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def body(self, prompt: str, seed: int) -> dict:
        """The request body: only what the configuration sets, the rest from the preset."""
        body = {"prompt": prompt, "size": self.size, "seed": seed}
        if self.num_inference_steps is not None:
            body["num_inference_steps"] = self.num_inference_steps
        if self.guidance_scale is not None:
            body["guidance_scale"] = self.guidance_scale
        return body


@dataclass
class Row:
    """What one configuration measured, or the error it got."""

    size: str
    num_inference_steps: int | None
    guidance_scale: float | None
    runs: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    vram_peak_bytes: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def _error(response: httpx.Response) -> str:
    try:
        err = response.json()["error"]
        return f"{response.status_code} {err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


def measure(
    client: httpx.Client,
    config: Config,
    preset: dict,
    runs: int,
    warmup: int,
    prompt: str,
    seed: int,
) -> Row:
    """Run one configuration; the first error ends it and becomes the row.

    Args:
        client: an httpx client whose base_url is the service.
        config: the size (and steps, guidance) to ask for.
        preset: the served default preset, for the steps and guidance an error row shows.
        runs: measured requests; latencies are their median per stage.
        warmup: requests sent first and not counted (first-call costs at a new size).
        prompt: the prompt of every request.
        seed: the seed of every request, so that runs are alike.
    """
    row = Row(
        config.size,
        config.num_inference_steps or preset.get("num_inference_steps"),
        preset.get("guidance_scale") if config.guidance_scale is None else config.guidance_scale,
    )
    answers = []
    for i in range(warmup + runs):
        try:
            response = client.post("/v1/images/generations", json=config.body(prompt, seed))
        except httpx.HTTPError as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            return row
        if response.status_code != 200:
            row.error = _error(response)
            return row
        if i >= warmup:
            answers.append(response.json())
    row.num_inference_steps = answers[0]["num_inference_steps"]
    row.guidance_scale = answers[0]["guidance_scale"]
    row.runs = len(answers)
    for stage in STAGES:
        values = [a["timings"][stage] for a in answers if stage in a["timings"]]
        if values:
            row.latency_ms[stage] = statistics.median(values)
        peaks = [a["vram"][stage] for a in answers if stage in a["vram"]]
        if peaks:
            row.vram_peak_bytes[stage] = max(peaks)
    return row


def _bytes(n: int) -> str:
    if n < 2**20:
        return f"{n} B"
    if n < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.2f} GiB"


def render_markdown(rows: list[Row], meta: dict) -> str:
    """The report as a markdown table (readable as plain text too): one line per stage."""
    lines = [
        f"# t2i report: {meta['model']} ({meta['family']}) at {meta['url']}",
        "",
        f"Latency: median of {meta['runs']} run(s) after {meta['warmup']} warm-up; "
        "VRAM: largest peak allocated during the stage (0 on CPU).",
        "",
        "| size | steps | guidance | stage | latency ms | VRAM peak |",
        "|---|--:|--:|---|--:|--:|",
    ]
    for row in rows:
        head = f"| {row.size} | {row.num_inference_steps} | {row.guidance_scale} "
        if row.error is not None:
            lines.append(head + f"| error | {row.error.replace('|', '/')} | |")
            continue
        for stage in STAGES:
            if stage not in row.latency_ms:
                continue
            latency = f"{row.latency_ms[stage]:.1f}"
            if stage == "denoise" and row.num_inference_steps:
                latency += f" ({row.latency_ms[stage] / row.num_inference_steps:.1f}/step)"
            peak = row.vram_peak_bytes.get(stage)
            lines.append(f"{head}| {stage} | {latency} | {'' if peak is None else _bytes(peak)} |")
            head = "| | | "
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], meta: dict) -> dict:
    """The report as plain data: `meta` plus one entry per configuration."""
    return {**meta, "rows": [row.__dict__ for row in rows]}


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (2 if the service cannot be asked)."""
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument(
        "--config",
        type=Config.parse,
        action="append",
        metavar="WxH[:STEPS[:GUIDANCE]]",
        help="a configuration to measure (repeatable); default: 768², 1024², 1280² at the "
        "default preset",
    )
    parser.add_argument("--runs", type=int, default=3, help="measured requests per config")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted requests first")
    parser.add_argument("--prompt", default="a lighthouse on a cliff in a storm, oil painting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--out", type=Path, help="also write the report here (.md or .json)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    if args.out is not None and args.out.suffix not in (".md", ".json"):
        parser.error(f"--out {args.out}: the name must end in .md or .json")
    configs = args.config or [Config(w, h) for w, h in DEFAULT_SIZES]

    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        try:
            response = client.get("/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            print(f"cannot ask {args.url}/v1/models: {exc}", file=sys.stderr)
            return 2
        preset = model["presets"][model["default_preset"]]
        meta = {
            "url": args.url,
            "model": model["id"],
            "family": model["family"],
            "runs": args.runs,
            "warmup": args.warmup,
        }
        rows = []
        for config in configs:
            rows.append(
                measure(client, config, preset, args.runs, args.warmup, args.prompt, args.seed)
            )
            print(f"measured {config.size}", file=sys.stderr, flush=True)

    table = render_markdown(rows, meta)
    print(table, end="")
    if args.out is not None:
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps(to_json(rows, meta), indent=2) + "\n")
        else:
            args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
