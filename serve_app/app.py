"""The application builder named by deploy/serve_config.yaml (`import_path`).

client -> Ingress (CPU) -> PromptEncoder (fraction of a GPU) -> Denoiser (GPU)
             \\-> InFlight (which requests run where, for cancel by id)
"""

from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments import Denoiser, PromptEncoder
from serve_app.inflight import InFlight
from serve_app.ingress import Ingress


def build_app(args: dict) -> Application:
    """Build the app from the config's `args` (see serve_app.config.AppConfig)."""
    config = AppConfig.model_validate(args)
    return Ingress.bind(
        config,
        PromptEncoder.bind(config.model),
        Denoiser.bind(config.model),
        InFlight.bind(),
    )
