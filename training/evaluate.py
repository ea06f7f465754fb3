"""Does the demo model draw what it is asked? Pixel statistics of its images, through
the service's own engine (the code that serves it).

    python -m training.evaluate serve_app/data/demo

A scene is drawn right when the colour at the shape's place and the colour away from
it are the asked ones (the nearest named colour of the region's median pixel). The
outline adapter works when, at its scale, the shape's centre shows the background while
its colour still draws a line around it.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.shapes import COLOURS, HELD_ASIDE, PLACES, Scene, held_aside

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _distance_to(image: np.ndarray, place: str) -> np.ndarray:
    h, w = image.shape[:2]
    fx, fy = PLACES[place]
    ys, xs = np.mgrid[0:h, 0:w]
    return np.hypot((xs + 0.5) / w - fx, (ys + 0.5) / h - fy)


def colour_at(image: np.ndarray, place: str, radius: float = 0.06) -> str:
    """Nearest named colour of the median pixel within `radius` (of the side) of the
    place's centre."""
    inside = _distance_to(image, place) < radius
    return nearest_colour(np.median(image[inside], axis=0))


def colour_away(image: np.ndarray, places: list[str], radius: float = 0.3) -> str:
    """Nearest named colour of the median pixel farther than `radius` from every place."""
    away = np.all([_distance_to(image, p) > radius for p in places], axis=0)
    return nearest_colour(np.median(image[away], axis=0))


def share_near(image: np.ndarray, colour: str, tolerance: float = 60.0) -> float:
    """Share of the pixels within `tolerance` (RGB distance) of a named colour."""
    distance = np.linalg.norm(image.astype(np.float32) - np.array(COLOURS[colour]), axis=-1)
    return float((distance < tolerance).mean())


@dataclass
class Check:
    caption: str
    seed: int
    shape: str  # the colour found at the shape's place
    background: str  # and away from it
    right: bool


def check(image: np.ndarray, scene: Scene, seed: int) -> Check:
    shape = scene.shapes[0]
    found, away = colour_at(image, shape.place), colour_away(image, [shape.place])
    right = found == shape.colour and away == scene.background
    return Check(scene.caption, seed, found, away, right)


class Drawer:
    """Images of the demo model through the engine: load_encoder + load_denoiser."""

    def __init__(self, model: str, device: str = "auto"):
        from serve_app.engine import load_denoiser, load_encoder
        from serve_app.engine.checkpoint import resolve
        from serve_app.engine.denoiser import LoraOptions

        self.model = resolve(model)[0]  # "demo" or a folder
        self.encoder = load_encoder(model, device)
        self.denoiser = load_denoiser(model, device, lora=LoraOptions(slots=1, max_rank=64))
        self._adapters = {}

    def __call__(
        self,
        prompt: str,
        seed: int = 0,
        steps: int = 12,
        guidance: float = 4.0,
        size: int = 256,
        lora: tuple[str, float] | None = None,
        on_preview=None,
        partial_images: int = 0,
    ) -> np.ndarray:
        from serve_app.messages import GenerationParams

        params = GenerationParams(
            prompt, None, size, size, steps, guidance, seed, partial_images=partial_images
        )
        loras = []
        if lora is not None:
            name, scale = lora
            if name not in self._adapters:
                path = self.model / "loras" / f"{name}.safetensors"
                self._adapters[name] = self.denoiser.read_adapter(path)
            loras = [(self._adapters[name], scale)]
        embeddings = self.encoder.encode_params(params)
        [image] = self.denoiser.generate(params, embeddings, loras=loras, on_preview=on_preview)
        return image


def evaluate(drawer: Drawer, seeds=(0, 1, 2), **settings) -> dict:
    """Share of the held-aside scenes drawn right, over `seeds`, at `settings`."""
    checks = [
        check(drawer(scene.caption, seed, **settings), scene, seed)
        for scene in (held_aside(*h) for h in HELD_ASIDE)
        for seed in seeds
    ]
    return {
        "settings": settings,
        "right": sum(c.right for c in checks) / len(checks),
        "wrong": [c.__dict__ for c in checks if not c.right],
    }


def hollow(image: np.ndarray, scene: Scene) -> bool:
    """Whether the shape's centre shows the background: drawn as an outline (the demo
    adapter's style), not filled."""
    shape = scene.shapes[0]
    return colour_at(image, shape.place, radius=0.03) == scene.background


def evaluate_outline(drawer: Drawer, seeds=(0, 1, 2), scale: float = 0.85, **settings) -> dict:
    """Share of the held-aside scenes drawn hollow with the adapter at `scale`, and
    without it (the adapter's effect, not the base model's)."""
    scenes = [held_aside(*h) for h in HELD_ASIDE]
    cases = [(scene, seed) for scene in scenes for seed in seeds]
    styled = [hollow(drawer(s.caption, seed, lora=("outline", scale), **settings), s)
              for s, seed in cases]  # fmt: skip
    plain = [hollow(drawer(s.caption, seed, **settings), s) for s, seed in cases]
    return {
        "settings": {**settings, "lora": ["outline", scale]},
        "hollow": sum(styled) / len(cases),
        "hollow_without_adapter": sum(plain) / len(cases),
    }


GRID_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square at the left on a black background",
    "a green triangle at the top on a white background",
    "a white star at the bottom on a blue background",
    "an orange circle at the right on a purple background",
    "a red star at the left and a blue circle at the right on a yellow background",
)


def grid(drawer: Drawer, rows: dict[str, dict], prompts=GRID_PROMPTS, seed: int = 0):
    """A PIL image: one row per entry of `rows` (name -> settings), one column a prompt."""
    from PIL import Image

    images = [[drawer(p, seed, **settings) for p in prompts] for settings in rows.values()]
    return Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in images], axis=0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the demo model's folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--grid", type=Path, help="draw a grid of samples here (PNG)")
    args = parser.parse_args(argv)
    drawer = Drawer(args.model, args.device)
    results = [
        evaluate(drawer, steps=steps, guidance=guidance)
        for steps in (8, 12, 20)
        for guidance in (0.0, 2.0, 4.0, 5.0, 6.0)
    ]
    for r in results:
        print(r["settings"], f"{r['right']:.2f}")
    for guidance in (4.0, 5.0):
        outline = evaluate_outline(drawer, steps=8, guidance=guidance)
        print(outline)
        results.append(outline)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        rows = {f"guidance {g}": {"steps": 12, "guidance": g} for g in (0.0, 2.0, 4.0, 6.0)} | {
            "outline 0.85": {"steps": 12, "guidance": 4.0, "lora": ("outline", 0.85)}
        }
        grid(drawer, rows).save(args.grid)


if __name__ == "__main__":
    main()
