"""Check a Serve config strictly before `serve deploy`: every key must be one Ray's schema
or our settings define, and every deployment one the app builds.

Ray's ServeDeploySchema accepts keys it does not know (`max_ongoing_requst: 4` passes and
is ignored), so a typo would deploy with a default in its place. Here every mapping is
walked against the pydantic model that reads it: Ray's for the config and deployments,
serve_app.config.AppConfig for the app's args.

    python -m deploy.check deploy/serve_config.yaml deploy/serve_config.multi_gpu.yaml
"""

import argparse
import sys
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

# The deployments serve_app.app builds besides each model's two.
APP_DEPLOYMENTS = ("Ingress", "InFlight")


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (through Optional, Union, list,
    Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        found = []
        for arg in typing.get_args(annotation):
            found += _models_in(arg)
        return found
    return []


def unknown_keys(model: type[BaseModel], data, where: str) -> list[str]:
    """Keys in `data` (and below it) that `model` does not define, as dotted paths."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {name: name for name in fields} | {
        f.alias: name for name, f in fields.items() if f.alias
    }
    problems = []
    for key, value in data.items():
        if key not in names:
            problems.append(f"{where}.{key}" if where else str(key))
            continue
        inner = _models_in(fields[names[key]].annotation)
        if not inner:
            continue  # a plain dict (args, runtime_env, user_config) or a value
        at = f"{where}.{key}" if where else str(key)
        if not isinstance(value, list):
            problems += unknown_keys(inner[0], value, at)
            continue
        for i, item in enumerate(value):  # named by its name where it has one
            label = item.get("name", i) if isinstance(item, dict) else i
            problems += unknown_keys(inner[0], item, f"{at}[{label}]")
    return problems


def check(config: dict) -> list[str]:
    """Every problem of a Serve config (empty: none): Ray's own validation, keys no
    schema defines, the app's args against AppConfig, deployments the app does not have,
    models with no deployments configured, and a split-guidance model's Denoiser not
    on 2 GPUs."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import AppConfig

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"Ray's schema: {e}"]
    problems = [f"unknown key {k}" for k in unknown_keys(ServeDeploySchema, config, "")]
    for app in config.get("applications", []):
        name = app.get("name", "?")
        try:
            args = AppConfig.model_validate(app.get("args") or {})
        except ValidationError as e:
            problems.append(f"application {name}: args: {e}")
            continue
        known = set(APP_DEPLOYMENTS)
        for model in args.models:
            known.update(model.deployment_names())
        configured = {d.get("name") for d in app.get("deployments", [])}
        problems += [
            f"application {name}: deployment {d!r} is none of the app's: {sorted(known)}"
            for d in sorted(configured - known, key=str)
        ]
        problems += [
            f"application {name}: model deployment {d!r} is not configured (its GPUs "
            "and replicas would be the code's defaults)"
            for d in sorted(known - configured - set(APP_DEPLOYMENTS))
        ]
        problems += split_guidance_problems(app, args)
    return problems


def split_guidance_problems(app: dict, args) -> list[str]:
    """A model with `options.split_guidance` runs each Denoiser replica on two cards (the
    transformer's second copy on the other): its Denoiser must ask for exactly 2 GPUs."""
    problems = []
    deployments = {d.get("name"): d for d in app.get("deployments", [])}
    for model in args.models:
        if model.options.get("split_guidance") is not True:
            continue
        denoiser = model.deployment_names()[1]
        gpus = (deployments.get(denoiser, {}).get("ray_actor_options") or {}).get("num_gpus")
        if gpus != 2:
            problems.append(
                f"application {app.get('name', '?')}: model {model.id!r} has "
                f"options.split_guidance, so {denoiser} needs ray_actor_options.num_gpus: 2 "
                f"(its own card and the second copy's), not {gpus}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=Path)
    failed = False
    for path in p.parse_args(argv).configs:
        problems = check(yaml.safe_load(path.read_text()))
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print(f"{path}: {'FAILED' if problems else 'ok'}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
