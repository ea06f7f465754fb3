import pytest

from serve_app.schema import InvalidRequest, Limits, parse_request, parse_size, resolve

PRESETS = {
    "turbo": {"width": 1024, "height": 1024, "num_inference_steps": 9, "guidance_scale": 0.0}
}


def params(**body):
    return resolve(parse_request({"prompt": "a cat", **body}), PRESETS, "turbo", Limits())


def test_preset_fills_what_the_request_leaves_out():
    p = params()
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale) == (1024, 1024, 9, 0.0)
    assert 0 <= p.seed < 2**53 and p.num_images == 1


def test_request_fields_override_the_preset():
    p = params(size="1280x768", num_inference_steps=20, guidance_scale=5, seed=0, n=3)
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale) == (1280, 768, 20, 5.0)
    assert (p.seed, p.num_images) == (0, 3)


def test_size_auto_means_the_preset():
    assert (params(size="auto").width, params(size="auto").height) == (1024, 1024)


def test_size_limits_are_configurable():
    assert parse_size("4096x4096", Limits(max_side=4096)) == (4096, 4096)
    with pytest.raises(InvalidRequest, match="from 512 to 2048"):
        parse_size("256x256", Limits(min_side=512))


def test_seeds_differ_when_not_given():
    assert len({params().seed for _ in range(5)}) == 5


def test_strict_types():
    with pytest.raises(InvalidRequest) as err:
        parse_request({"prompt": "a", "seed": "1"})
    assert err.value.param == "seed"
