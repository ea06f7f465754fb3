"""Where model weights come from: a local diffusers-format folder, the shipped `demo`, or
an embedded `tiny`.

Nothing is ever fetched from a hub: every `from_pretrained` here reads a local folder.
The family is read from the folder's model_index.json, never guessed from its name.
"""

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from serve_app.errors import CheckpointError

# The hub libraries read these at import; set them before transformers/diffusers load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# model_index.json `_class_name` -> family (one engine package per family).
FAMILIES = {"ZImagePipeline": "zimage", "StableDiffusionXLPipeline": "sdxl"}
# Embedded checkpoints, generated on first use by their family's `tiny` module.
TINY = {"tiny": "zimage", "tiny-sdxl": "sdxl"}
# Checkpoints shipped in the package: the demo model, trained by training/train_demo.py.
SHIPPED = {"demo": Path(__file__).parents[1] / "data" / "demo"}
# A checkpoint folder's own presets, if it has them (the demo's): {"presets": {name:
# {width, height, num_inference_steps, guidance_scale, loras}}, "default_preset": name}.
PRESETS_FILE = "presets.json"


def cache_dir() -> Path:
    """Folder for generated checkpoints: $T2I_CACHE, else ~/.cache/t2i."""
    return Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i"))


def resolve(model: str) -> tuple[Path, str]:
    """Turn the `model` setting into (folder, family).

    Args:
        model: "demo" (the shipped Z-Image demo model), "tiny" (Z-Image) or "tiny-sdxl"
            for an embedded checkpoint (generated on first use), or the path of a local
            diffusers-format folder such as a download of Tongyi-MAI/Z-Image-Turbo or
            stabilityai/stable-diffusion-xl-base-1.0, or the URI of one (file://, s3://,
            gs://: see serve_app/engine/fetch.py).
    """
    if model in SHIPPED:
        path = SHIPPED[model]
    elif "://" in model:  # copied to local disk once per node, checked (see fetch)
        from serve_app.engine.fetch import local_copy

        path = local_copy(model, cache_dir())
    elif model in TINY:
        tiny = importlib.import_module(f"serve_app.engine.{TINY[model]}.tiny")
        path = tiny.ensure_tiny(cache_dir())
    else:
        path = Path(model).expanduser()
    return path, family_of(path, model)


def family_of(path: Path, model: str | None = None) -> str:
    """The family of the checkpoint folder `path`, from its model_index.json."""
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(
            f"model={model or str(path)!r}: no model_index.json in {path}. Set `model` to one "
            f"of {', '.join([*SHIPPED, *TINY])} or to a local diffusers-format folder (e.g. a "
            "download of Tongyi-MAI/Z-Image-Turbo)."
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"model={model or str(path)!r}: {index} is unreadable: {exc}"
        ) from None
    if class_name not in FAMILIES:
        raise CheckpointError(
            f"model={model or str(path)!r}: pipeline {class_name!r} is not served here; "
            f"supported: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[class_name]


def read_presets(path: Path) -> tuple[dict[str, dict], str] | None:
    """(presets, default preset) of the checkpoint folder `path`, from its presets.json,
    or None if it has none (its family's presets apply)."""
    file = path / PRESETS_FILE
    if not file.is_file():
        return None
    try:
        content = json.loads(file.read_text())
        presets, default = content["presets"], content["default_preset"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} is unreadable: {exc!r}") from None
    if default not in presets:
        raise CheckpointError(f"{file}: default_preset {default!r} is not among its presets")
    return presets, default


def save_once(final: Path, save: Callable[[Path], None], marker: str = "model_index.json") -> Path:
    """`final`, holding what `save(folder)` writes, written there unless it already is.

    Several processes may start at once: each saves into its own temporary folder and
    the first rename wins, so a reader never sees a half-written folder. `marker` is
    the file whose presence means the folder is complete.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        save(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
