"""Rich labels derived on hand-made scenes whose errors are known."""

import numpy as np
import pytest
import torch

from corpus.prompt_suite import Condition, Prompt
from corpus.world import Scene, SceneObject
from models.evaluation.world_judge import render_scenes
from models.feedback.rich_labels import CORRUPTIONS, corrupt, rich_labels
from models.feedback.utility import UtilityConfig

U = UtilityConfig()
ASKED = Scene(
    (SceneObject("star", "red", "large", 0, 0), SceneObject("circle", "blue", "large", 0, 2)),
    "white",
)
PROMPT = Prompt(
    "p0",
    "position",
    "a red star left of a blue circle",
    "a red star left of a blue circle",
    (
        Condition(
            "relation", "star", "red", relation="left of", other_shape="circle", other_colour="blue"
        ),
    ),
    ASKED,
)


def _labels(scene):
    image = render_scenes([scene], 30)[0]
    return rich_labels(PROMPT, scene, image, image, U)


def test_an_image_that_shows_the_prompt_has_no_keyword_and_no_misaligned_pixel():
    out = _labels(ASKED)
    assert out["keywords"] == []
    assert out["misalignment"].sum() == 0
    assert out["scores"] == {
        "plausibility": 1.0,
        "alignment": 1.0,
        "composition": 1.0,
        "overall": 1.0,
    }


def test_objects_in_the_wrong_places_flag_the_relation_and_both_cells():
    swapped = Scene(
        (SceneObject("star", "red", "large", 0, 2), SceneObject("circle", "blue", "large", 0, 0)),
        "white",
    )
    out = _labels(swapped)
    assert out["keywords"] == ["left", "of"]
    m = out["misalignment"]
    assert m[0:10, 0:10].all() and m[0:10, 20:30].all()  # both objects' cells
    assert m[10:, :].sum() == 0 and m[:, 10:20].sum() == 0
    assert out["scores"]["alignment"] == 0.0 and out["scores"]["composition"] == 0.0


def test_a_wrong_colour_flags_the_colour_word_and_the_object_drawn_in_it():
    green = Scene(
        (SceneObject("star", "green", "large", 0, 0), SceneObject("circle", "blue", "large", 0, 2)),
        "white",
    )
    out = _labels(green)
    assert out["keywords"] == ["blue", "red"]  # the relation's colours (either may be wrong)
    assert out["misalignment"][0:10, 0:10].all()


def test_a_missing_object_is_named_but_has_no_place_to_mark():
    alone = Scene((SceneObject("star", "red", "large", 0, 0),), "white")
    out = _labels(alone)
    assert {"circle", "blue"} <= set(out["keywords"])
    assert out["misalignment"].sum() == 0


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "distorted_word"])
def test_a_corruption_marks_implausible_pixels_only_inside_the_damaged_cell(kind):
    scene = Scene((SceneObject("square", "red", "large", 1, 1),), "white")
    clean = render_scenes([scene], 30)[0]
    damaged = corrupt(clean, scene, kind, seed=0)
    out = rich_labels(PROMPT, scene, damaged, clean, U)
    heat = out["implausibility"]
    assert heat[10:20, 10:20].sum() > 0  # the centre cell, the object's
    outside = heat.copy()
    outside[10:20, 10:20] = 0
    assert outside.sum() == 0
    assert out["scores"]["plausibility"] < 1.0


def test_a_distorted_word_is_implausible_in_the_words_cell():
    scene = Scene((), "white", word="CAT", word_row=2, word_col=0)
    clean = render_scenes([scene], 64)[0]
    damaged = corrupt(clean, scene, "distorted_word", seed=0)
    heat = rich_labels(PROMPT, scene, damaged, clean, U)["implausibility"]
    rows, cols = np.nonzero(heat)
    assert len(rows) and rows.min() >= 42 and cols.max() < 22


def test_a_corruption_without_its_subject_is_refused():
    clean = torch.zeros(3, 30, 30, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs a scene with a rendered word"):
        corrupt(clean, Scene((), "white"), "distorted_word", seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(clean, ASKED, "smudged", seed=0)
