"""What the OpenAPI document cannot learn from the routes: the generation body.

The generation routes parse their body themselves (parse_request words the errors), so
FastAPI does not know its models: they are stated here, with their $refs pointing into
the document's components, and added there when the document is built.
"""

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from serve_app.schema import ImageRequest

_REFS, _MODELS = models_json_schema(
    [(ImageRequest, "validation")], ref_template="#/components/schemas/{model}"
)
GENERATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _REFS[ImageRequest, "validation"]}},
    }
}


def add_body_schemas(app: FastAPI) -> None:
    """Make `app`'s document hold the body's models in components.schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)  # builds and keeps app.openapi_schema
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_MODELS["$defs"])
        return app.openapi_schema

    app.openapi = openapi
