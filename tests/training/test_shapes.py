import numpy as np
import pytest
import torch

from training.evaluate import colour_at, colour_away
from training.shapes import HELD_ASIDE, PLACES, Scene, Shape, draw_scenes, held_aside, render


def pixels(scene: Scene, outline: bool = False) -> np.ndarray:
    image = render([scene], outline=outline)[0]
    return ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_the_same_seed_draws_the_same_scenes():
    assert draw_scenes(3, 50) == draw_scenes(3, 50)
    assert draw_scenes(3, 50) != draw_scenes(4, 50)


def test_held_aside_scenes_are_never_drawn():
    held = set(HELD_ASIDE)
    for scene in draw_scenes(0, 20000):
        one = scene.shapes[0]
        assert (
            len(scene.shapes) == 2
            or (
                one.colour,
                one.kind,
                one.place,
                scene.background,
            )
            not in held
        )
    # ...while their neighbours are: only the exact combination is held aside.
    seen = {(s.shapes[0].colour, s.shapes[0].kind) for s in draw_scenes(0, 20000)}
    assert {(c, k) for c, k, _, _ in HELD_ASIDE} <= seen


@pytest.mark.parametrize(
    "scene, caption",
    [
        (Scene("blue", (Shape("red", "circle", "centre"),)), "a red circle on a blue background"),
        (
            Scene("blue", (Shape("red", "circle", "centre"),), say_centre=True),
            "a red circle in the centre on a blue background",
        ),
        (
            Scene("orange", (Shape("yellow", "star", "left"), Shape("white", "square", "right"))),
            "a yellow star at the left and a white square at the right on an orange background",
        ),
    ],
)
def test_captions(scene, caption):
    assert scene.caption == caption


@pytest.mark.parametrize("kind", ["circle", "square", "triangle", "star"])
@pytest.mark.parametrize("place", list(PLACES))
def test_a_shape_is_drawn_in_its_colour_at_its_place(kind, place):
    scene = Scene("purple", (Shape("yellow", kind, place),))
    image = pixels(scene)
    assert colour_at(image, place) == "yellow"
    assert colour_away(image, [place]) == "purple"
    # Outlined, its middle shows the background and its colour only the line.
    outlined = pixels(scene, outline=True)
    assert colour_at(outlined, place) == "purple"
    yellow = (np.abs(outlined.astype(int) - (240, 220, 30)).sum(-1) < 60).mean()
    assert 0.003 < yellow < (np.abs(image.astype(int) - (240, 220, 30)).sum(-1) < 60).mean()


def test_held_aside_scenes_read_back_as_asked():
    for h in HELD_ASIDE:
        scene, place = held_aside(*h), h[2]
        image = pixels(scene)
        assert (colour_at(image, place), colour_away(image, [place])) == (h[0], h[3])


@pytest.mark.parametrize("outline", [False, True])
def test_a_batch_draws_each_scene_as_it_is_drawn_alone(outline):
    scenes = draw_scenes(5, 40)
    assert {len(s.shapes) for s in scenes} == {1, 2}
    batch = render(scenes, 64, outline=outline)
    for i, scene in enumerate(scenes):
        torch.testing.assert_close(batch[i], render([scene], 64, outline=outline)[0])
