"""The application builder named by deploy/serve_config.yaml (`import_path`).

client -> Ingress (CPU) -> PromptEncoder-<model> (fraction of a GPU) -> Denoiser-<model> (GPU)
             \\-> InFlight (which requests run where, for cancel by id)

Each served model gets its own PromptEncoder and Denoiser deployments, named after its
id, so that each has its own replicas, GPUs and queue, set in the config's `deployments`.
"""

from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments import Denoiser, PromptEncoder
from serve_app.inflight import InFlight, ModelLimit
from serve_app.ingress import Ingress


def build_app(args: dict) -> Application:
    """Build the app from the config's `args` (see serve_app.config.AppConfig)."""
    config = AppConfig.model_validate(args)
    encoders, denoisers = {}, {}
    for model in config.models:
        encoder_name, denoiser_name = model.deployment_names()
        encoders[model.id] = PromptEncoder.options(name=encoder_name).bind(model)
        denoisers[model.id] = Denoiser.options(name=denoiser_name).bind(model)
    limits = {
        m.id: ModelLimit(m.deployment_names()[1], m.requests_per_replica) for m in config.models
    }
    # Above the longest a request may run: only a record whose owner died gets that old.
    inflight = InFlight.bind(limits, stale_after_s=config.request_timeout_s + 60)
    return Ingress.bind(config, encoders, denoisers, inflight)
