"""The HTTP edge: validation, request ids, the generation flow, answers, the web page."""

from serve_app.ingress.answers import images_body
from serve_app.ingress.routes import Ingress, app

__all__ = ["Ingress", "app", "images_body"]
