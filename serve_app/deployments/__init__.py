"""The model replicas: thin Serve deployments around the engine, one PromptEncoder and
one Denoiser deployment per served model."""

from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.encoder import PromptEncoder

__all__ = ["Denoiser", "PromptEncoder"]
