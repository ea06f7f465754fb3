import base64
import json

from serve_app.ingress import images_body


def test_images_body_is_the_json_that_json_dumps_would_write():
    images = [base64.b64encode(b"\x89PNG one"), base64.b64encode(b"\x89PNG two")]
    fields = {"created": 1, "seed": 7, "timings": {"e2e": 2.5}, "id": 'quote " and \\'}
    body = json.loads(images_body(images, fields))
    assert body == {"data": [{"b64_json": i.decode()} for i in images], **fields}


def test_images_body_without_other_fields():
    assert json.loads(images_body([b"QUJD"], {})) == {"data": [{"b64_json": "QUJD"}]}
