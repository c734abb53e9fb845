"""The prompt suite and GenEval's all-conditions rule, on hand-made scenes."""

from __future__ import annotations

import json

import pytest

from corpus.prompt_suite import (
    CATEGORIES,
    DEFAULT_SUITE,
    FORMS,
    Condition,
    Prompt,
    build_suite,
    judge_prompt,
    load_suite,
)
from corpus.world import Scene, SceneObject


def obj(shape, colour, row, col, size="large"):
    return SceneObject(shape, colour, size, row, col)


def binding_prompt() -> Prompt:
    conds = (
        Condition("object", shape="circle", colour="red"),
        Condition("object", shape="square", colour="blue"),
    )
    scene = Scene((obj("circle", "red", 0, 0), obj("square", "blue", 1, 1)), "white")
    return Prompt("t", "colour_binding", "a red circle and a blue square", "", conds, scene)


def test_an_image_passes_only_when_every_condition_holds():
    p = binding_prompt()
    good = Scene((obj("square", "blue", 2, 2), obj("circle", "red", 0, 1)), "gray")
    assert judge_prompt(p, good)["passed"]
    # Colours swapped between the objects: each shape and each colour is there, but the
    # binding is wrong, so both conditions fail.
    swapped = Scene((obj("circle", "blue", 0, 0), obj("square", "red", 1, 1)), "white")
    verdict = judge_prompt(p, swapped)
    assert not verdict["passed"]
    assert verdict["conditions"] == [("has a red circle", False), ("has a blue square", False)]
    # One of two conditions is not enough.
    half = Scene((obj("circle", "red", 0, 0),), "white")
    verdict = judge_prompt(p, half)
    assert not verdict["passed"] and [ok for _, ok in verdict["conditions"]] == [True, False]


def test_counting_is_exact_and_position_reads_the_grid():
    three = Prompt(
        "c", "counting", "three stars", "", (Condition("count", shape="star", n=3),),
        Scene((), "white"),
    )  # fmt: skip
    stars = [obj("star", "red", 0, c) for c in range(3)]
    assert judge_prompt(three, Scene(tuple(stars), "white"))["passed"]
    assert not judge_prompt(three, Scene(tuple(stars[:2]), "white"))["passed"]
    four = (*stars, obj("star", "blue", 1, 0))
    assert not judge_prompt(three, Scene(four, "white"))["passed"]

    left = Prompt(
        "p", "position", "a circle left of a square", "",
        (Condition("relation", shape="circle", relation="left of", other_shape="square"),),
        Scene((), "white"),
    )  # fmt: skip
    assert judge_prompt(
        left, Scene((obj("circle", "red", 2, 0), obj("square", "red", 0, 2)), "white")
    )["passed"]
    assert not judge_prompt(
        left, Scene((obj("circle", "red", 0, 2), obj("square", "red", 0, 0)), "white")
    )["passed"]
    # Same column: neither left nor right.
    assert not judge_prompt(
        left, Scene((obj("circle", "red", 0, 1), obj("square", "red", 2, 1)), "white")
    )["passed"]

    word = Prompt(
        "w", "word", 'the word "CAT"', "", (Condition("word", word="CAT"),), Scene((), "white")
    )
    assert judge_prompt(word, Scene((), "white", "CAT", 1, 1))["passed"]
    assert not judge_prompt(word, Scene((), "white", "DOG", 1, 1))["passed"]
    assert not judge_prompt(word, Scene((), "white"))["passed"]


def test_committed_suite_is_what_the_generator_writes():
    """The versioned suite cannot drift from its generator, and covers every category in
    both forms with reference scenes that pass their own prompts."""
    doc = json.loads(DEFAULT_SUITE.read_text())
    regenerated = build_suite(doc["per_category"], doc["seed"])
    assert [p.to_dict() for p in regenerated] == doc["prompts"]
    prompts = load_suite()
    assert {p.category for p in prompts} == set(CATEGORIES)
    for p in prompts:
        assert all(p.text(f).strip() for f in FORMS)
        assert judge_prompt(p, p.scene)["passed"]
    assert len({p.id for p in prompts}) == len(prompts)
    with pytest.raises(ValueError, match="unknown prompt form 'long'"):
        prompts[0].text("long")


def test_missing_suite_says_how_to_write_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m corpus\.prompt_suite"):
        load_suite(tmp_path / "nope.json")
