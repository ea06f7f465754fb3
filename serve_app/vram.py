"""How much device memory a request will take on a Denoiser, predicted before it runs, so
that the ingress refuses what can never fit (413) instead of finding out on the GPU.

A request's memory beyond the loaded model is fitted per family to GPU measurements
(load_tests/measure_vram.py on full-size random weights; load_tests/fit_vram.py writes
serve_app/data/vram.json from its output):

    extra = base + per_pixel * pixels + per_latent_pixel * pixels * batch
            + per_image_pixel * pixels * images (+ adapter, when the request uses one)

where `batch` is images times 2 with classifier-free guidance (the model's batch) and
`images` the VAE's. (Measured: the one-image decode dominates, so `per_pixel` carries
most of it; the decoder runs one image at a time.) The prediction is that, times a
safety margin, plus what the replica holds resident (weights, adapter slots, resident
adapters). No torch here: the ingress runs it.
"""

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

from serve_app.errors import WillNotFit
from serve_app.messages import GenerationParams
from serve_app.schema import Limits

# Measured peaks scatter a little around the fit; allocator rounding and fragmentation
# add to what was allocated. The fit's worst error is in the data file.
MARGIN = 1.10


@dataclass(frozen=True)
class Fit:
    """One family's coefficients (bytes, bytes per pixel), and the fit's quality."""

    base: float
    per_pixel: float
    per_latent_pixel: float
    per_image_pixel: float
    adapter: float
    max_error: float  # the worst relative error of the fit on its measurements

    def extra_bytes(self, width: int, height: int, images: int, guided: bool, adapters: bool):
        pixels = width * height
        batch = images * (2 if guided else 1)
        extra = self.base + self.per_pixel * pixels + self.per_latent_pixel * pixels * batch
        extra += self.per_image_pixel * pixels * images
        return extra + (self.adapter if adapters else 0.0)


@cache
def fits() -> dict[str, Fit]:
    """Each family's fit, from serve_app/data/vram.json."""
    data = json.loads(resources.files("serve_app").joinpath("data/vram.json").read_text())
    return {family: Fit(**f["coefficients"]) for family, f in data["families"].items()}


def predict(family: str, params: GenerationParams, guided: bool, resident_bytes: int) -> int:
    """Peak device bytes of the Denoiser replica while it draws `params` (`guided`: with
    classifier-free guidance, by the family's rule)."""
    fit = fits()[family]
    extra = fit.extra_bytes(
        params.width, params.height, params.num_images, guided, bool(params.loras)
    )
    return int(resident_bytes + MARGIN * extra)


def largest_side(
    family: str,
    params: GenerationParams,
    guided: bool,
    resident_bytes: int,
    budget_bytes: int,
    multiple: int,
) -> int:
    """The largest square side (a multiple of `multiple`) that fits `budget_bytes` with
    the rest of `params` as asked; 0 if none does."""
    fit = fits()[family]
    adapters = bool(params.loras)
    room = (budget_bytes - resident_bytes) / MARGIN - fit.extra_bytes(0, 0, 1, guided, adapters)
    per_pixel = fit.extra_bytes(1, 1, params.num_images, guided, adapters)
    per_pixel -= fit.extra_bytes(0, 0, params.num_images, guided, adapters)
    if room <= 0 or per_pixel <= 0:
        return 0
    return int(math.isqrt(int(room / per_pixel)) // multiple * multiple)


def check_fits(family: str, params: GenerationParams, memory: dict, limits: Limits) -> None:
    """Refuse (WillNotFit, HTTP 413) a request predicted to need more than the budget of
    its model's Denoiser replicas; `memory` is their describe()'s `memory` (no budget:
    nothing refused)."""
    budget = memory["budget_bytes"]
    if budget is None:
        return
    guided = params.guidance_scale > memory["guidance_above"]
    needed = predict(family, params, guided, memory["resident_bytes"])
    if needed <= budget:
        return
    side = largest_side(
        family, params, guided, memory["resident_bytes"], budget, limits.side_multiple
    )
    side = min(side, limits.max_side) if side >= limits.min_side else 0
    raise WillNotFit(params.width, params.height, params.num_images, needed, budget, side)
