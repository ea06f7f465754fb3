"""deploy/serve_config.multi_gpu.yaml laid out for a node of another number of GPUs.

The file is written for 8 GPUs: both prompt encoders on fractions of one card, one
Denoiser replica per other card (Z-Image up to 5, SDXL up to 2). `adapt` keeps that
shape for N GPUs: the encoders packed on one card as the file sets their shares, and the
N - 1 other cards shared out among the models' Denoisers in the file's proportions
(their autoscaling maxima), at least one each; on one GPU, the single-GPU layout of
deploy/serve_config.yaml (each model an equal part of the card: its encoder a quarter
of it, its Denoiser the rest). `cards` packs a config's replicas onto cards the way Ray
places fractional and whole GPUs, to show and check the result.

    python -m deploy.layout --gpus 4                    # the adapted config, as YAML
    python -m deploy.layout --gpus 2 --models zimage    # one model on a 2-GPU node

Used by load_tests/bench_multi_gpu.py; tests/deploy/test_layout.py checks every layout
for 1, 2, 3, 4 and 8 GPUs against `python -m deploy.check`.
"""

import argparse
import copy
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "deploy" / "serve_config.multi_gpu.yaml"
# Ray counts resources in units of 1/10000: shares are rounded down to it, so that the
# shares on one card never add up to more than the card.
UNIT = 10_000


class LayoutError(ValueError):
    """The config cannot be laid out on the GPUs asked for."""


def _floor_share(share: float) -> float:
    return math.floor(share * UNIT) / UNIT


def _application(config: dict) -> dict:
    apps = config.get("applications", [])
    if len(apps) != 1:
        raise LayoutError(f"one application expected, the config has {len(apps)}")
    return apps[0]


def _deployment(app: dict, name: str) -> dict:
    for d in app.get("deployments", []):
        if d.get("name") == name:
            return d
    names = [d.get("name") for d in app.get("deployments", [])]
    raise LayoutError(f"deployment {name!r} is not configured; the config has {names}")


def most_replicas(deployment: dict) -> int:
    """The replicas a deployment may run at most: its autoscaling maximum, else its
    num_replicas (Serve's default 1)."""
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("max_replicas", 1))
    return int(deployment.get("num_replicas", 1))


def model_ids(config: dict) -> list[str]:
    """The ids of the models the config's application serves, in its order."""
    return [m["id"] for m in _application(config)["args"]["models"]]


def share_cards(cards: int, weights: dict[str, int]) -> dict[str, int]:
    """`cards` whole cards shared out among models in proportion to `weights`, at least
    one each: each its proportional count rounded down (1 at least), then a card at a
    time to whoever is furthest below its proportional count (or from whoever is
    furthest above it); ties to the earlier model.

    Args:
        cards: the cards the Denoisers get.
        weights: model id -> its weight (the file's most Denoiser replicas), in order.
    """
    if cards < len(weights):
        raise LayoutError(
            f"{cards} card(s) for Denoisers cannot give each of the models "
            f"{list(weights)} one: serve fewer models (e.g. only {next(iter(weights))!r}) "
            "or use more GPUs"
        )
    total = sum(weights.values())
    exact = {m: cards * w / total for m, w in weights.items()}
    share = {m: max(1, int(exact[m])) for m in weights}
    while sum(share.values()) > cards:
        over = min((m for m in share if share[m] > 1), key=lambda m: exact[m] - share[m])
        share[over] -= 1
    while sum(share.values()) < cards:
        share[max(share, key=lambda m: exact[m] - share[m])] += 1
    return share


def _set_replicas(deployment: dict, replicas: int, autoscaled: bool) -> None:
    """At most `replicas`: the autoscaling range clipped to it (autoscaled), else a fixed
    count (the autoscaling config dropped)."""
    autoscaling = deployment.get("autoscaling_config")
    if autoscaled and autoscaling:
        autoscaling["max_replicas"] = replicas
        for key in ("min_replicas", "initial_replicas"):
            if key in autoscaling:
                autoscaling[key] = min(autoscaling[key], replicas)
        deployment.pop("num_replicas", None)
        return
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = replicas


def adapt(config: dict, gpus: int, models: list[str] | None = None) -> dict:
    """The config laid out for a node of `gpus` GPUs; `config` is not changed.

    One GPU: every kept model gets an equal part of the card, a quarter of it for its
    PromptEncoder and the rest for its Denoiser, one replica each (no autoscaling).
    Two or more: the PromptEncoders keep the file's shares, which must fit one card
    together (card 0); each Denoiser replica gets a whole card, the other `gpus` - 1
    cards shared out among the models in proportion to the file's most Denoiser
    replicas (at least one each); each Denoiser's autoscaling maximum is its share
    (minimum and initial replicas clipped to it), or, without autoscaling, its
    num_replicas.

    Args:
        config: a Serve config of one application (deploy/serve_config.multi_gpu.yaml).
        gpus: the GPUs of the node.
        models: the model ids to keep (their deployments with them); None: all.
    Raises:
        LayoutError: what does not fit, and what would (fewer models, more GPUs).
    """
    if gpus < 1:
        raise LayoutError(f"gpus must be 1 or more (got {gpus})")
    out = copy.deepcopy(config)
    app = _application(out)
    ids = model_ids(out)
    keep = ids if models is None else list(models)
    unknown = [m for m in keep if m not in ids]
    if unknown or not keep:
        raise LayoutError(f"models {keep} are not (all) in the config; it has {ids}")
    dropped = {
        f"{kind}-{m}" for m in ids if m not in keep for kind in ("PromptEncoder", "Denoiser")
    }
    app["args"]["models"] = [m for m in app["args"]["models"] if m["id"] in keep]
    app["deployments"] = [d for d in app["deployments"] if d.get("name") not in dropped]
    encoders = [_deployment(app, f"PromptEncoder-{m}") for m in keep]
    denoisers = [_deployment(app, f"Denoiser-{m}") for m in keep]

    if gpus == 1:
        part = 1 / len(keep)
        for encoder, denoiser in zip(encoders, denoisers, strict=True):
            _set_replicas(encoder, 1, autoscaled=False)
            _set_replicas(denoiser, 1, autoscaled=False)
            encoder.setdefault("ray_actor_options", {})["num_gpus"] = _floor_share(part / 4)
            denoiser.setdefault("ray_actor_options", {})["num_gpus"] = _floor_share(part * 3 / 4)
    else:
        on_card_0 = sum(
            round(e.get("ray_actor_options", {}).get("num_gpus", 0) * UNIT) * most_replicas(e)
            for e in encoders
        )
        if on_card_0 > UNIT:
            raise LayoutError(
                f"the PromptEncoders' GPU shares add up to {on_card_0 / UNIT:g} cards: they "
                "must fit one card together (lower their num_gpus or num_replicas)"
            )
        weights = {m: most_replicas(d) for m, d in zip(keep, denoisers, strict=True)}
        shares = share_cards(gpus - 1, weights)
        for model, denoiser in zip(keep, denoisers, strict=True):
            _set_replicas(denoiser, shares[model], autoscaled=True)
            denoiser.setdefault("ray_actor_options", {})["num_gpus"] = 1
    used = len(cards(out))
    if used > gpus:  # a check of the above: never expected
        raise LayoutError(f"the layout takes {used} cards, not {gpus}")
    return out


def pin_denoiser(config: dict, model: str, replicas: int) -> dict:
    """The config with `model`'s Denoiser at exactly `replicas` replicas (no
    autoscaling), for a measurement at a fixed count; `config` is not changed.

    Args:
        config: a config from `adapt` (or one made from it).
        model: the model id.
        replicas: 1 or more; at most the cards `adapt` gave the model, which the
            caller keeps to (a config already pinned lower no longer says it).
    """
    if replicas < 1:
        raise LayoutError(f"Denoiser-{model} needs 1 replica or more (asked {replicas})")
    out = copy.deepcopy(config)
    _set_replicas(_deployment(_application(out), f"Denoiser-{model}"), replicas, autoscaled=False)
    return out


def cards(config: dict) -> list[list[tuple[str, float]]]:
    """Every replica of the config (at its most replicas) on cards, as Ray places them:
    a fractional share on the fullest card it fits (best fit), the encoders' first; a
    whole-GPU replica on cards of its own. Each card: (deployment, share) per replica.

    Args:
        config: a Serve config of one application.
    """
    fractional, whole = [], []
    for d in _application(config).get("deployments", []):
        share = d.get("ray_actor_options", {}).get("num_gpus", 0)
        if not share:
            continue
        units = round(share * UNIT)
        if units >= UNIT and units % UNIT:
            raise LayoutError(f"{d['name']}: num_gpus {share} above 1 must be a whole number")
        (whole if units >= UNIT else fractional).extend([(d["name"], units)] * most_replicas(d))
    # Encoders first, then the larger shares: the order the file means "card 0" by.
    fractional.sort(key=lambda r: (not r[0].startswith("PromptEncoder-"), -r[1]))
    placed: list[list[tuple[str, int]]] = []
    for name, units in fractional:
        fits = [c for c in placed if sum(u for _, u in c) + units <= UNIT]
        if fits:
            max(fits, key=lambda c: sum(u for _, u in c)).append((name, units))
        else:
            placed.append([(name, units)])
    for name, units in whole:
        placed += [[(name, UNIT)] for _ in range(units // UNIT)]
    return [[(name, units / UNIT) for name, units in card] for card in placed]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", type=Path, default=SOURCE)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--models", nargs="+", help="model ids to keep (default: all)")
    args = p.parse_args(argv)
    try:
        out = adapt(yaml.safe_load(args.source.read_text()), args.gpus, args.models)
    except LayoutError as e:
        print(f"{args.source}: {e}", file=sys.stderr)
        return 1
    for i, card in enumerate(cards(out)):
        print(f"# card {i}: " + ", ".join(f"{n} {s:g}" for n, s in card))
    print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
