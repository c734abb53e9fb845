import math
import random

import pytest

from corpus.caption_metrics import (
    KINDS,
    Claims,
    caption_quality,
    extract_claims,
    quality_table_markdown,
    score_caption,
)
from corpus.scene_text import alt_text, descriptive_caption, short_caption
from corpus.world import Scene, SceneObject, WorldConfig, sample_scene

# A large red circle top left, a small blue square bottom right, the word CAT top right.
TWO = Scene(
    (SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 2, 2)),
    "white",
    "CAT",
    0,
    2,
)
# Two identical red circles and a green cross below the main one.
THREE = Scene(
    (
        SceneObject("circle", "red", "large", 0, 0),
        SceneObject("circle", "red", "large", 0, 1),
        SceneObject("cross", "green", "small", 1, 0),
    ),
    "gray",
)
# Four distinct objects around a main star in the centre.
FOUR = Scene(
    (
        SceneObject("star", "yellow", "large", 1, 1),
        SceneObject("hexagon", "pink", "small", 0, 0),
        SceneObject("diamond", "cyan", "small", 2, 1),
        SceneObject("triangle", "orange", "large", 1, 2),
    ),
    "beige",
    "HI",
    2,
    2,
)
ONE = Scene((SceneObject("triangle", "purple", "small", 1, 1),), "black")


def assert_perfect(caption: str, scene: Scene) -> None:
    sc = score_caption(caption, scene)
    assert not sc["hallucinated"], (caption, sc)
    for kind in KINDS:
        assert sc[kind]["n_true"] == sc[kind]["n_claims"], (kind, caption, sc[kind])
        assert sc[kind]["n_facts_stated"] == sc[kind]["n_facts"], (kind, caption, sc[kind])


@pytest.mark.parametrize("scene", [ONE, TWO, THREE, FOUR])
@pytest.mark.parametrize("seed", range(5))
def test_descriptive_caption_of_hand_made_scenes_is_perfect(scene, seed):
    assert_perfect(descriptive_caption(scene, random.Random(seed)), scene)


def test_descriptive_captions_of_random_scenes_are_perfect():
    rng = random.Random(0)
    scenes = [sample_scene(rng, WorldConfig(word_prob=0.5)) for _ in range(300)]
    captions = [descriptive_caption(s, rng) for s in scenes]
    for caption, scene in zip(captions, scenes, strict=True):
        assert_perfect(caption, scene)
    q = caption_quality(captions, scenes)
    for kind in KINDS:  # every kind is exercised, so 1.0 is not vacuous
        assert q[kind]["claims"] > 0 and q[kind]["facts"] > 0, kind
        assert q[kind]["precision"] == q[kind]["recall"] == 1.0, (kind, q[kind])
    assert q["overall"] == {"hallucination_rate": 0.0, "captions": 300}


def test_descriptive_caption_parses_into_the_expected_claims():
    caption = descriptive_caption(TWO, random.Random(0))
    c = extract_claims(caption)
    assert c.shapes == ["circle", "square"]
    assert c.colors == [("red", "circle"), ("blue", "square")]
    assert c.sizes == [("large", "red", "circle"), ("small", "blue", "square")]
    assert c.counts == {("red", "circle"): 1, ("blue", "square"): 1}
    assert c.positions == [("red", "circle", "top left"), ("blue", "square", "bottom right")]
    assert sorted(c.relations) == [
        (("red", "circle"), "above", ("blue", "square")),
        (("red", "circle"), "left of", ("blue", "square")),
    ]
    assert c.background == ["white"] and c.words == ["CAT"]


def test_short_caption_is_precise_but_incomplete():
    for scene in (TWO, THREE, FOUR):
        caption = short_caption(scene)
        sc = score_caption(caption, scene)
        assert not sc["hallucinated"], caption
        assert sc["object"]["n_facts_stated"] < sc["object"]["n_facts"]
    q = caption_quality([short_caption(s) for s in (TWO, THREE, FOUR)], [TWO, THREE, FOUR])
    assert q["object"]["precision"] == 1.0 and q["object"]["recall"] == pytest.approx(3 / 8)
    assert math.isnan(q["position"]["precision"]) and q["position"]["recall"] == 0.0
    assert short_caption(THREE) == "two red circles"
    assert score_caption("two red circles", THREE)["count"]["n_true"] == 1


def test_wrong_colour_is_a_false_claim():
    sc = score_caption("a blue circle", TWO)
    assert sc["colour"] == {"n_claims": 1, "n_true": 0, "n_facts": 2, "n_facts_stated": 0}
    assert sc["object"]["n_true"] == 1  # the circle itself is there
    assert sc["count"]["n_true"] == 0  # there is no blue circle, let alone one
    assert sc["hallucinated"]
    q = caption_quality(["a blue circle"], [TWO])
    assert q["colour"]["precision"] == 0.0 and q["overall"]["hallucination_rate"] == 1.0


def test_missing_object_lowers_recall_exactly():
    q = caption_quality(["a large red circle in the top left"], [TWO])
    assert q["object"]["recall"] == 0.5 and q["object"]["precision"] == 1.0
    assert q["colour"]["recall"] == 0.5 and q["size"]["recall"] == 0.5
    assert q["position"]["recall"] == 0.5 and q["count"]["recall"] == 0.5
    assert q["overall"]["hallucination_rate"] == 0.0


def test_wrong_count_is_false():
    sc = score_caption("three red circles", THREE)
    assert sc["count"] == {"n_claims": 1, "n_true": 0, "n_facts": 2, "n_facts_stated": 0}
    assert sc["hallucinated"]
    # Counts add up over mentions; a bare mention makes the pair's count unstated.
    assert extract_claims("a red circle and one red circle").counts == {("red", "circle"): 2}
    assert extract_claims("a red circle and red circles").counts == {}
    assert extract_claims("red circle").counts == {}
    assert extract_claims("3 circles and 2 blue stars").counts == {("blue", "star"): 2}


def test_wrong_position_is_false():
    sc = score_caption("a red circle in the center and a blue square in the bottom right", TWO)
    assert sc["position"] == {"n_claims": 2, "n_true": 1, "n_facts": 2, "n_facts_stated": 1}
    assert sc["hallucinated"]
    c = extract_claims("two red circles in the top left and the top center, a green cross")
    assert c.positions == [("red", "circle", "top left"), ("red", "circle", "top center")]


def test_reversed_relation_is_false():
    right = "the red circle is to the left of the blue square"
    wrong = "the red circle is to the right of the blue square"
    assert score_caption(right, TWO)["relation"]["n_true"] == 1
    sc = score_caption(wrong, TWO)
    assert extract_claims(wrong).relations == [(("blue", "square"), "left of", ("red", "circle"))]
    assert sc["relation"] == {"n_claims": 1, "n_true": 0, "n_facts": 2, "n_facts_stated": 0}
    assert sc["hallucinated"]
    # Definite references state relations only, never objects.
    assert extract_claims(right).shapes == []
    below = extract_claims("The green cross is below the red circle.").relations
    assert below == [(("red", "circle"), "above", ("green", "cross"))]
    assert (
        score_caption("The green cross is below the red circle.", THREE)["relation"]["n_true"] == 1
    )


def test_wrong_word_is_false():
    sc = score_caption('The word "DOG" is written in the top right.', TWO)
    assert sc["word"] == {"n_claims": 1, "n_true": 0, "n_facts": 1, "n_facts_stated": 0}
    assert sc["hallucinated"]
    assert score_caption("a CAT sign", TWO)["word"]["n_true"] == 1  # all-caps WORDS token


def test_alt_text_kinds():
    assert extract_claims("IMG_0042.png") == Claims()
    sc = score_caption("IMG_0042.png", TWO)
    assert not sc["hallucinated"] and sc["object"]["n_facts_stated"] == 0
    c = extract_claims("red_circle_final_v2.png")
    assert c.shapes == ["circle"] and c.colors == [("red", "circle")] and c.counts == {}
    assert extract_claims("Buy now! art print only $5.99 at ShapeMart") == Claims()
    assert extract_claims("") == Claims()
    for kind in ("plain", "filename", "empty", "tangential"):
        for seed in range(20):  # these kinds never lie about the scene
            assert not score_caption(alt_text(FOUR, kind, random.Random(seed)), FOUR)[
                "hallucinated"
            ]
    for seed in range(20):
        assert score_caption(alt_text(FOUR, "wrong_attribute", random.Random(seed)), FOUR)[
            "hallucinated"
        ]


def test_caption_quality_checks_lengths():
    with pytest.raises(ValueError, match="captions"):
        caption_quality(["a red circle"], [TWO, THREE])


def test_quality_table_markdown():
    scenes = [TWO, THREE, FOUR]
    results = {
        "alt_text": caption_quality(["IMG_0042.png", "red circle", ""], scenes),
        "short_caption": caption_quality([short_caption(s) for s in scenes], scenes),
        "descriptive_caption": caption_quality(
            [descriptive_caption(s, random.Random(0)) for s in scenes], scenes
        ),
    }
    table = quality_table_markdown(results)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| kind | alt_text P | alt_text R | short_caption P")
    assert len(lines) == 2 + len(KINDS) + 1
    for kind in KINDS:
        assert any(line.startswith(f"| {kind} |") for line in lines)
    assert lines[-1].startswith("| hallucination rate | 0.000 |")
    position = next(line for line in lines if line.startswith("| position |"))
    assert position.split(" | ")[1] == "-"  # NaN precision: alt-text places nothing
    assert "| 1.000 | 1.000 |" in position
    assert "nan" not in table


def test_false_claims_by_kind_agree_with_the_tallies_of_score_caption():
    """The fast judge of a beam search (per-scene truth sets) and the scorer (facts and
    claims) count the same false claims, on true, false, noisy and cut captions."""
    from corpus.caption_metrics import false_claims_by_kind
    from corpus.scene_text import NOISE_KINDS

    rng = random.Random(7)
    scenes = [sample_scene(rng, WorldConfig()) for _ in range(60)]
    captions = []
    for sc in scenes:
        text = descriptive_caption(sc, rng)
        captions += [text, short_caption(sc), alt_text(sc, rng.choice(NOISE_KINDS), rng)]
        captions += [text[: rng.randrange(len(text))] for _ in range(3)]
    false_seen = 0
    for caption in captions:
        for scene in rng.sample(scenes, 4):
            tallies = score_caption(caption, scene)
            want = {k: tallies[k]["n_claims"] - tallies[k]["n_true"] for k in KINDS}
            assert false_claims_by_kind(caption, scene) == want, caption
            false_seen += sum(want.values())
    assert false_seen > 1000  # most pairs are another scene's caption
