"""load_tests.local_service's config: what the tests and benchmarks change in the file."""

import yaml

from load_tests.local_service import CONFIG, make_config


def test_env_adds_to_the_applications_environment_and_keeps_the_files():
    shipped = yaml.safe_load(CONFIG.read_text())["applications"][0]["runtime_env"]["env_vars"]
    config = make_config(None, None, 8123, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    env = config["applications"][0]["runtime_env"]["env_vars"]
    assert env == {**shipped, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    assert config["http_options"]["port"] == 8123
