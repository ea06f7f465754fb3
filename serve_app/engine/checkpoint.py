"""Where model weights come from: a local diffusers-format folder, or the embedded `tiny`.

Nothing is ever fetched from a hub: every `from_pretrained` here reads a local folder.
"""

import json
import os
from pathlib import Path

# The hub libraries read these at import; set them before transformers/diffusers load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TINY = "tiny"

# model_index.json `_class_name` -> family name (one engine file per family).
FAMILIES = {"ZImagePipeline": "zimage"}


class CheckpointError(ValueError):
    """The model setting does not point at a usable checkpoint."""


def cache_dir() -> Path:
    """Folder for generated checkpoints: $T2I_CACHE, else ~/.cache/t2i."""
    return Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i"))


def resolve(model: str) -> tuple[Path, str]:
    """Turn the `model` setting into (folder, family).

    Args:
        model: "tiny" for the embedded checkpoint (generated on first use), or the path of
            a local diffusers-format folder such as a download of Tongyi-MAI/Z-Image-Turbo.
    """
    if model == TINY:
        from serve_app.engine.tiny import ensure_tiny

        return ensure_tiny(cache_dir()), "zimage"
    path = Path(model).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(
            f"model={model!r}: no model_index.json in {path}. Set `model` to 'tiny' or to a "
            "local diffusers-format folder (e.g. a download of Tongyi-MAI/Z-Image-Turbo)."
        )
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in FAMILIES:
        raise CheckpointError(
            f"model={model!r}: pipeline {class_name!r} is not served here; "
            f"supported: {sorted(FAMILIES)}."
        )
    return path, FAMILIES[class_name]
