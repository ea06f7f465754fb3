"""Text-to-image service: a Z-Image-Turbo style engine served by Ray Serve.

`serve_app.engine` is plain torch + diffusers and imports no Ray; the deployments in
`serve_app.deployments` and the HTTP edge in `serve_app.ingress` wrap it.
"""
