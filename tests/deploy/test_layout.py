"""deploy/layout.py: the multi-GPU config laid out for 1, 2, 3, 4 and 8 GPUs."""

import copy

import pytest
import yaml

from deploy.check import check
from deploy.layout import (
    SOURCE,
    LayoutError,
    adapt,
    cards,
    main,
    most_replicas,
    pin_denoiser,
    share_cards,
)
from load_tests.local_service import CONFIG as SINGLE_GPU

MULTI = yaml.safe_load(SOURCE.read_text())
BOTH = ["zimage", "sdxl"]
# (GPUs, models kept) of every layout tested; two models need three GPUs or more.
LAYOUTS = [
    (1, BOTH),
    (1, ["zimage"]),
    (2, ["zimage"]),
    (2, ["sdxl"]),
    (3, BOTH),
    (4, BOTH),
    (4, ["sdxl"]),
    (8, BOTH),
    (8, ["zimage"]),
]


def deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


@pytest.mark.parametrize("gpus,models", LAYOUTS, ids=lambda v: str(v))
def test_every_layout_passes_the_strict_check_and_fits_its_cards(gpus, models):
    config = adapt(MULTI, gpus, models)
    assert check(config) == []
    assert [m["id"] for m in config["applications"][0]["args"]["models"]] == models
    placed = cards(config)
    assert len(placed) == gpus
    for card in placed:  # no card holds more than itself
        assert sum(share for _, share in card) <= 1.0, card
    encoders = {f"PromptEncoder-{m}" for m in models}
    if gpus == 1:
        assert {name for name, _ in placed[0]} == encoders | {f"Denoiser-{m}" for m in models}
        return
    # Card 0: every encoder and nothing else; every other card: one Denoiser replica.
    assert {name for name, _ in placed[0]} == encoders
    assert all(share < 1 for _, share in placed[0])
    for card in placed[1:]:
        assert len(card) == 1 and card[0][0].startswith("Denoiser-") and card[0][1] == 1, card
    per_model = {m: sum(card[0][0] == f"Denoiser-{m}" for card in placed[1:]) for m in models}
    assert all(n >= 1 for n in per_model.values()) and sum(per_model.values()) == gpus - 1
    for model, n in per_model.items():
        autoscaling = deployments(config)[f"Denoiser-{model}"]["autoscaling_config"]
        assert autoscaling["max_replicas"] == n
        assert 1 <= autoscaling["min_replicas"] <= n


def test_eight_gpus_give_the_file_itself():
    # The file is written for an 8-GPU node: laid out for 8, nothing changes.
    assert adapt(MULTI, 8) == MULTI


def test_four_gpus_share_the_denoiser_cards_in_the_files_proportions():
    d = deployments(adapt(MULTI, 4))
    assert d["Denoiser-zimage"]["autoscaling_config"]["max_replicas"] == 2  # file: 5 of 7
    assert d["Denoiser-sdxl"]["autoscaling_config"]["max_replicas"] == 1  # file: 2 of 7
    assert d["PromptEncoder-zimage"] == deployments(MULTI)["PromptEncoder-zimage"]


def test_autoscaling_range_is_clipped_to_the_cards():
    # The file starts each Denoiser at 1; a config that starts more than its cards
    # hold is clipped, not left asking for replicas that cannot be placed.
    config = copy.deepcopy(MULTI)
    autoscaling = deployments(config)["Denoiser-zimage"]["autoscaling_config"]
    autoscaling.update(min_replicas=4, initial_replicas=3)
    clipped = deployments(adapt(config, 3, ["zimage"]))["Denoiser-zimage"]["autoscaling_config"]
    assert clipped["min_replicas"] == clipped["initial_replicas"] == clipped["max_replicas"] == 2


def test_cards_pack_as_ray_does():
    # Ray gives a fractional share the card it fits most tightly (best fit); the
    # encoders are placed first so that they make card 0; a whole GPU takes a card.
    def deployment(name: str, share: float, replicas: int = 1) -> dict:
        return {"name": name, "num_replicas": replicas, "ray_actor_options": {"num_gpus": share}}

    config = {
        "applications": [
            {
                "deployments": [
                    deployment("Ingress", 0),
                    deployment("Denoiser-a", 0.6),
                    deployment("Denoiser-b", 0.3),
                    deployment("PromptEncoder-a", 0.5),
                    deployment("Denoiser-c", 1, replicas=2),
                ]
            }
        ]
    }
    assert cards(config) == [
        [("PromptEncoder-a", 0.5)],
        [("Denoiser-a", 0.6), ("Denoiser-b", 0.3)],  # 0.9 of this card, not 0.8 of card 0
        [("Denoiser-c", 1.0)],
        [("Denoiser-c", 1.0)],
    ]


def test_one_gpu_is_the_single_gpu_files_layout():
    # Both models on one card: each deployment's share and replicas as in
    # deploy/serve_config.yaml, the layout `make serve` runs.
    single = deployments(yaml.safe_load(SINGLE_GPU.read_text()))
    adapted = deployments(adapt(MULTI, 1))
    for name in ("PromptEncoder-zimage", "Denoiser-zimage", "PromptEncoder-sdxl", "Denoiser-sdxl"):
        assert (
            adapted[name]["ray_actor_options"]["num_gpus"]
            == (single[name]["ray_actor_options"]["num_gpus"])
        )
        assert most_replicas(adapted[name]) == most_replicas(single[name]) == 1
        assert "autoscaling_config" not in adapted[name]
    # One model has the card to itself: a quarter for its encoder (DESIGN.md).
    alone = deployments(adapt(MULTI, 1, ["zimage"]))
    assert alone["PromptEncoder-zimage"]["ray_actor_options"]["num_gpus"] == 0.25
    assert alone["Denoiser-zimage"]["ray_actor_options"]["num_gpus"] == 0.75


@pytest.mark.parametrize("models", [3, 6])
def test_shares_never_add_up_past_a_card(models):
    # Thirds and sixths of a card, rounded to the nearest of Ray's units, would add up
    # past it (six models: 6 x (0.0417 + 0.125) = 1.0002).
    config = copy.deepcopy(MULTI)
    app = config["applications"][0]
    for i in range(models - 2):
        app["args"]["models"].append({**app["args"]["models"][0], "id": f"more{i}"})
        for kind in ("PromptEncoder", "Denoiser"):
            like = deployments(MULTI)[f"{kind}-zimage"]
            app["deployments"].append({**like, "name": f"{kind}-more{i}"})
    adapted = adapt(config, 1)
    assert check(adapted) == []
    [card] = cards(adapted)
    assert len(card) == 2 * models and sum(share for _, share in card) <= 1.0


def test_too_few_cards_for_the_models_is_refused():
    with pytest.raises(LayoutError, match="cannot give each of the models"):
        adapt(MULTI, 2)


def test_encoders_that_do_not_fit_one_card_are_refused():
    config = copy.deepcopy(MULTI)
    deployments(config)["PromptEncoder-sdxl"]["ray_actor_options"]["num_gpus"] = 0.75
    with pytest.raises(LayoutError, match="must fit one card"):
        adapt(config, 4)


def test_unknown_models_and_no_gpus_are_refused():
    with pytest.raises(LayoutError, match="not .all. in the config"):
        adapt(MULTI, 4, ["flux"])
    with pytest.raises(LayoutError, match="1 or more"):
        adapt(MULTI, 0)


def test_adapt_leaves_its_input_alone():
    before = copy.deepcopy(MULTI)
    adapt(MULTI, 1)
    adapt(MULTI, 3, ["sdxl"])
    assert before == MULTI


@pytest.mark.parametrize("cards_, weights, expected", [
    (7, {"zimage": 5, "sdxl": 2}, {"zimage": 5, "sdxl": 2}),
    (3, {"zimage": 5, "sdxl": 2}, {"zimage": 2, "sdxl": 1}),
    (2, {"zimage": 5, "sdxl": 2}, {"zimage": 1, "sdxl": 1}),
    (15, {"zimage": 5, "sdxl": 2}, {"zimage": 11, "sdxl": 4}),
    (4, {"a": 1, "b": 1, "c": 1}, {"a": 2, "b": 1, "c": 1}),
    (3, {"a": 20, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1}),
    (5, {"a": 20, "b": 1, "c": 1}, {"a": 3, "b": 1, "c": 1}),
])  # fmt: skip
def test_share_cards(cards_, weights, expected):
    assert share_cards(cards_, weights) == expected


def test_pinned_denoiser_has_a_fixed_count():
    config = pin_denoiser(adapt(MULTI, 8, ["zimage"]), "zimage", 7)
    denoiser = deployments(config)["Denoiser-zimage"]
    assert denoiser["num_replicas"] == 7 and "autoscaling_config" not in denoiser
    assert check(config) == []
    assert len(cards(config)) == 8
    assert most_replicas(deployments(pin_denoiser(config, "zimage", 1))["Denoiser-zimage"]) == 1
    with pytest.raises(LayoutError, match="1 replica or more"):
        pin_denoiser(config, "zimage", 0)


def test_the_command_line_prints_a_config_that_passes(capsys):
    assert main(["--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "# card 0: PromptEncoder-zimage 0.5, PromptEncoder-sdxl 0.25" in out
    assert check(yaml.safe_load(out)) == []
    assert main(["--gpus", "2"]) == 1
    assert "only 'zimage'" in capsys.readouterr().err
