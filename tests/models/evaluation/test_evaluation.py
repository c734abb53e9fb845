"""The eval report's parts: the world judge on hand-made scenes, the promotion gate on
fabricated scores, the reference CLIP's loading path, and HTML escaping."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from corpus.prompt_suite import ATTRIBUTES, REASONS, Condition, Prompt, diagnose, judge_prompt
from corpus.world import Scene, SceneObject
from models.common.clip import MissingWeightsError, create_clip
from models.evaluation.feedback_columns import (
    FeedbackModels,
    same_prompt_auc,
    same_prompt_pairs,
    score_form,
)
from models.evaluation.promotion_gate import promotion_decision
from models.evaluation.reference_clip import (
    TINY_MODEL,
    ReferenceClipConfig,
    load_reference_clip,
    train_reference_clip,
)
from models.evaluation.report import (
    drawn_objects,
    flat_metrics,
    summarise_diagnoses,
    write_dvc_metrics,
)
from models.evaluation.report_html import write_html_report
from models.evaluation.world_judge import (
    MissingJudgeError,
    blur,
    judge_accuracy,
    load_judge,
    render_scenes,
    shift,
)


def o(shape, colour, row, col, size="large"):
    return SceneObject(shape, colour, size, row, col)


HAND_MADE = [
    Scene((o("circle", "red", 0, 0), o("square", "blue", 2, 2)), "white"),
    Scene((o("star", "yellow", 1, 1),), "black", "CAT", 0, 2),
    Scene(tuple(o("triangle", "green", 2, c, "small") for c in range(3)), "gray"),
    Scene((o("hexagon", "purple", 0, 1), o("cross", "orange", 1, 0, "small")), "beige"),
]

# "a red circle and a blue square", met by HAND_MADE[0].
BINDING = Prompt(
    "b", "colour_binding", "a red circle and a blue square", "",
    (Condition("object", shape="circle", colour="red"),
     Condition("object", shape="square", colour="blue")),
    HAND_MADE[0],
)  # fmt: skip


def test_judge_reads_hand_made_scenes_and_catches_known_errors(judge_dir):
    judge = load_judge(judge_dir)
    read = judge.predict(render_scenes(HAND_MADE, judge.cfg.resolution))
    acc = judge_accuracy(HAND_MADE, read)
    assert acc["shape"] == acc["colour"] == acc["position"] == acc["count"] == 1.0, read

    binding = BINDING
    assert judge_prompt(binding, read[0])["passed"]
    # Known errors, drawn on purpose: colours swapped, one object missing.
    errors = [
        Scene((o("circle", "blue", 0, 0), o("square", "red", 2, 2)), "white"),
        Scene((o("circle", "red", 0, 0),), "white"),
    ]
    for scene in judge.predict(render_scenes(errors, judge.cfg.resolution)):
        assert not judge_prompt(binding, scene)["passed"]
    three = Prompt(
        "c",
        "counting",
        "three triangles",
        "",
        (Condition("count", shape="triangle", n=3),),
        HAND_MADE[2],
    )
    assert judge_prompt(three, read[2])["passed"]
    two = Scene(tuple(o("triangle", "green", 2, c, "small") for c in range(2)), "gray")
    assert not judge_prompt(three, judge.predict(render_scenes([two], 32))[0])["passed"]
    above = Prompt(
        "p", "position", "a hexagon above a cross", "",
        (Condition("relation", shape="hexagon", relation="above", other_shape="cross"),),
        HAND_MADE[3],
    )  # fmt: skip
    assert judge_prompt(above, read[3])["passed"]
    flipped = Scene((o("hexagon", "purple", 2, 1), o("cross", "orange", 1, 0, "small")), "beige")
    assert not judge_prompt(above, judge.predict(render_scenes([flipped], 32))[0])["passed"]


def test_judge_reads_larger_images_at_its_own_resolution(judge_dir):
    judge = load_judge(judge_dir)
    big = render_scenes(HAND_MADE[:1], 64)
    assert (
        judge.predict(big)[0].objects == judge.predict(render_scenes(HAND_MADE[:1], 32))[0].objects
    )


def test_judge_reads_shifted_and_blurred_renders_of_hand_made_scenes(judge_dir):
    # Generated objects sit a pixel or two off their cell's centre, with soft edges: the
    # judge is trained on such renders and must read them as it reads clean ones.
    judge = load_judge(judge_dir)
    renders = render_scenes(HAND_MADE, judge.cfg.resolution)
    clean = judge.predict(renders)
    for perturbed in (shift(renders, 2, seed=1), blur(renders, 0.7)):
        assert [s.objects for s in judge.predict(perturbed)] == [s.objects for s in clean]


def test_shift_moves_every_pixel_and_fills_in_the_edge():
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    img[0, :, 3, 4] = 255
    moved = shift(img, 2, seed=0)
    dy, dx = torch.nonzero(moved[0, 0]).tolist()[0]
    assert (moved > 0).sum() == 3  # one pixel, three channels, nothing wrapped around
    assert abs(dy - 3) <= 2 and abs(dx - 4) <= 2
    assert moved.dtype == torch.uint8 and moved.shape == img.shape


def test_missing_judge_says_how_to_make_one(tmp_path):
    with pytest.raises(MissingJudgeError, match="materialize the world_judge asset"):
        load_judge(tmp_path)


def test_gate_promotes_within_noise_and_refuses_beyond_it():
    rng = np.random.default_rng(0)
    champion = {f"p{i}": float(s) for i, s in enumerate(rng.uniform(0.3, 0.7, 112))}
    # Fabricated challengers either side of the interval.
    slightly_worse = {k: v - 0.01 + rng.normal(0, 0.1) for k, v in champion.items()}
    much_worse = {k: v - 0.25 for k, v in champion.items()}
    better = {k: v + 0.2 for k, v in champion.items()}
    d = promotion_decision(slightly_worse, champion)
    assert d["promote"] and d["ci_low"] < 0 < d["ci_high"]
    d = promotion_decision(much_worse, champion)
    assert not d["promote"] and d["ci_high"] < 0 and "worse beyond noise" in d["reason"]
    assert promotion_decision(better, champion)["promote"]
    assert promotion_decision(better, None) == {
        "promote": True, "reason": "no champion yet", "n_prompts": 112
    }  # fmt: skip
    with pytest.raises(ValueError, match="different prompts"):
        promotion_decision({"p0": 1.0}, {"q0": 1.0})


def check_partial_progress(m: dict) -> None:
    """The partial-progress keys of one form: scores in [0, 1], every failed image with a
    reason, primary-reason shares adding up to 1 over the failed images."""
    assert set(m["attribute_judged"]) == set(ATTRIBUTES)
    assert set(m["attribute_accuracy"]) == {k for k, n in m["attribute_judged"].items() if n}
    assert all(0.0 <= v <= 1.0 for v in m["attribute_accuracy"].values())
    fr = m["failure_reasons"]
    assert list(fr["share_with_reason"]) == list(fr["share_primary"]) == list(REASONS)
    assert all(0.0 <= v <= 1.0 for v in [*fr["share_with_reason"].values(),
                                         *fr["share_primary"].values()])  # fmt: skip
    assert 0 <= fr["failed"] <= fr["images"]
    assert sum(fr["share_primary"].values()) == pytest.approx(1.0 if fr["failed"] else 0.0)
    for r in REASONS:  # a primary reason is one of the image's reasons
        assert fr["share_primary"][r] <= fr["share_with_reason"][r] + 1e-12


def test_attribute_scores_and_failure_breakdown_on_scenes_with_known_errors(tmp_path):
    binding = BINDING
    scenes = [
        HAND_MADE[0],  # passes
        Scene((o("circle", "blue", 0, 0), o("square", "red", 2, 2)), "white"),  # colours swapped
        Scene((o("circle", "red", 0, 0),), "white"),  # the square missing
        Scene((), "white"),  # nothing
        Scene((o("circle", "red", 0, 0), o("star", "blue", 1, 1), o("cross", "red", 0, 2)),
              "black"),  # a star for the square, and one object too many
    ]  # fmt: skip
    diagnoses = [diagnose(binding, s, "descriptive") for s in scenes]
    summary = summarise_diagnoses(diagnoses)
    check_partial_progress(summary)
    # shape: 2 + 1 + 1 + 0 held of 2 + 2 + 2 + 0 + 2 judged (nothing judged on the empty one);
    # colour, given the shape: 2 + 0 + 1 + 1 of 2 + 2 + 1 + 1; size, given shape and colour:
    # 2 + 1 + 1 of 2 + 1 + 1; place, the same objects: all in their cells; background: 4 of 5.
    assert summary["attribute_accuracy"] == {
        "shape": 6 / 8, "colour": 4 / 6, "size": 1.0, "place": 1.0, "background": 4 / 5
    }  # fmt: skip
    assert summary["attribute_judged"] == {
        "shape": 8, "colour": 6, "size": 4, "place": 4, "count": 0, "relation": 0,
        "background": 5, "word": 0,
    }  # fmt: skip
    fr = summary["failure_reasons"]
    assert fr["images"] == 5 and fr["failed"] == 4
    assert fr["share_with_reason"] == {
        **dict.fromkeys(REASONS, 0.0),
        "no_object": 0.25, "wrong_shape": 0.5, "wrong_colour": 0.25, "extra_object": 0.25,
    }  # fmt: skip
    assert fr["share_primary"] == {
        **dict.fromkeys(REASONS, 0.0), "no_object": 0.25, "wrong_shape": 0.5, "wrong_colour": 0.25
    }  # fmt: skip

    flat = flat_metrics({"forms": {"descriptive": {
        "prompt_following": {"overall": 0.2}, "clip_score": 20.0, **summary
    }}})  # fmt: skip
    assert flat["eval/descriptive/attribute/shape"] == 0.75
    assert flat["eval/descriptive/failure/extra_object"] == 0.25
    assert flat["eval/descriptive/failure_primary/wrong_shape"] == 0.5
    assert "eval/descriptive/attribute/count" not in flat  # never judged


def test_drawn_objects_count_every_guess_not_the_best_one():
    star = Prompt("s", "single_object", "a star", "A star.", (Condition("object", "star"),),
                  Scene((o("star", "red", 1, 1),), "white"))  # fmt: skip
    guesses = Scene((o("star", "red", 1, 1), o("circle", "red", 0, 0), o("square", "red", 2, 2)),
                    "white")  # fmt: skip
    # Both images pass "a star"; the first holds two objects of no asked shape.
    drawn = drawn_objects([star, star, BINDING], [guesses, star.scene, HAND_MADE[0]])
    assert drawn["images"] == 3 and drawn["objects_per_image"] == 2.0
    assert drawn["asked_per_image"] == 4 / 3
    assert drawn["asked_shape_share"] == 4 / 6
    one = drawn["one_object_prompts"]
    assert one == {
        "images": 2, "objects_per_image": 2.0, "asked_per_image": 1.0, "asked_shape_share": 0.5
    }  # fmt: skip
    empty = drawn_objects([star], [Scene((), "white")])
    assert empty["objects_per_image"] == 0.0 and empty["asked_shape_share"] is None
    flat = flat_metrics({"forms": {"short": {
        "prompt_following": {"overall": 1.0}, "clip_score": 0.0, "drawn": drawn
    }}})  # fmt: skip
    assert flat["eval/short/drawn/one_object/objects_per_image"] == 2.0
    assert flat["eval/short/drawn/asked_shape_share"] == 4 / 6


def _short_form_report(model: str, **form) -> dict:
    """A report's metrics with one form, `short`, of one prompt; `form` adds to it."""
    return {
        "config": {"model": model},
        "model_steps": 10,
        "suite_version": "v1",
        "prompts": 1,
        "images_per_prompt": 1,
        "forms": {
            "short": {
                "prompt_following": {"colour": 0.0, "overall": 0.0},
                "prompt_following_ci": [0.0, 0.0],
                "clip_score": 12.0,
                "clip_truncated_prompts": 0,
                **form,
            }
        },
        "seconds": {"total_s": 1.0},
    }


def test_report_escapes_caption_text(tmp_path):
    evil = '<script>alert("x")</script> a red circle'
    metrics = _short_form_report(
        "<b>m</b>",
        attribute_accuracy={"shape": 0.5},
        attribute_judged={"shape": 2, "<b>size</b>": 0},
        failure_reasons={
            "images": 2,
            "failed": 1,
            "share_with_reason": {"<u>no_object</u>": 1.0},
            "share_primary": {"<u>no_object</u>": 1.0},
        },
    )
    metrics |= {"judge_accuracy": {"shape": 1.0}, "reference_clip": {}}
    records = [
        {
            "prompt_id": "colour-00",
            "form": "short",
            "prompt": evil,
            "passed": False,
            "conditions": [["has a <i>red</i> circle", False]],
        }
    ]
    page = write_html_report(
        tmp_path, metrics, records, {"promote": False, "reason": "<x>"}
    ).read_text()
    assert "<script>" not in page and "<b>m</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; a red circle" in page
    assert "<u>" not in page and "&lt;u&gt;no_object&lt;/u&gt;" in page
    assert "Attribute accuracy given that the object exists" in page and "Why images fail" in page


def test_scores_are_compared_only_between_images_of_the_same_prompt():
    passed = np.array([True, False, True, False, False])
    pos, neg = same_prompt_pairs(passed, ["a", "a", "b", "b", "b"])
    assert sorted(zip(pos.tolist(), neg.tolist(), strict=True)) == [(0, 1), (2, 3), (2, 4)]
    # Prompt a's images score high, b's low: across prompts the failing image 1 would
    # outrank the passing image 2; within each prompt every passing image wins.
    assert same_prompt_auc(np.array([0.9, 0.8, 0.3, 0.2, 0.1]), pos, neg) == 1.0
    assert same_prompt_auc(np.array([0.9, 0.8, 0.3, 0.3, 0.4]), pos, neg) == 0.5  # win, tie, loss
    none = same_prompt_pairs(np.array([True, False]), ["a", "b"])
    assert same_prompt_auc(np.array([0.5, 0.5]), *none) is None


class _ScoresByText:
    """A preference model stand-in: each text's score."""

    def __init__(self, by_text: dict[str, float]):
        self.by_text = by_text

    def preference(self, images, texts):
        return np.array([self.by_text[t] for t in texts])


def test_feedback_columns_score_each_image_and_compare_within_prompts():
    a, b = BINDING, Prompt("c", "colour", "a red circle", "", BINDING.conditions[:1], HAND_MADE[0])
    prompts, passed = [a, a, b, b], [True, False, False, True]
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    texts = ["x", "y", "z", "w"]
    models = FeedbackModels(preference=_ScoresByText({"x": 0.3, "y": 0.1, "z": 0.9, "w": 0.2}))
    per_image, summary, heatmaps = score_form(models, images, texts, prompts, HAND_MADE, passed)
    assert [r["preference"] for r in per_image] == pytest.approx([0.3, 0.1, 0.9, 0.2])
    # Prompt a: the passing image wins; prompt b: the failing one does.
    assert summary["same_prompt_pairs"] == 2 and summary["preference_same_prompt_auc"] == 0.5
    assert summary["preference"] == pytest.approx(0.375) and heatmaps is None
    assert "rich_overall" not in summary and "rich_scores" not in per_image[0]
    assert score_form(FeedbackModels(), images, texts, prompts, HAND_MADE, passed) == (
        [{}, {}, {}, {}],
        {},
        None,
    )


def test_dvc_metrics_leave_out_undefined_feedback_measures(tmp_path):
    """`dvc metrics show` drops nulls and empty sections: the file must read back as it is."""
    feedback = {"preference": 0.4, "preference_same_prompt_auc": None,
                "missed_words": {"precision": None, "recall": None, "f1": None}}  # fmt: skip
    metrics = _short_form_report("m", attribute_accuracy={}, failure_reasons={}, feedback=feedback)
    (tmp_path / "report" / "plots").mkdir(parents=True)
    for name in ("prompt_following.json", "training_curve.json"):
        (tmp_path / "report" / "plots" / name).write_text("[]")
    write_dvc_metrics(tmp_path / "report", tmp_path / "metrics", metrics)
    written = json.loads((tmp_path / "metrics" / "eval_report.json").read_text())
    assert written["short"]["feedback"] == {"preference": 0.4}


def test_report_page_shows_the_feedback_models_table_and_their_overlay_grids(tmp_path):
    feedback = {"preference": 0.41, "preference_same_prompt_auc": 0.73, "rich_overall": 0.6,
                "rich_overall_same_prompt_auc": None, "same_prompt_pairs": 7,
                "missed_words": {"precision": 0.5, "recall": None, "f1": None}}  # fmt: skip
    metrics = _short_form_report("m", feedback=feedback)
    (tmp_path / "grids").mkdir()
    for name in ("colour-short", "colour-short-feedback"):
        (tmp_path / "grids" / f"{name}.png").write_bytes(b"")
    page = write_html_report(tmp_path, metrics, []).read_text()
    assert "The feedback models on these images" in page
    assert '<td class="n">0.730</td>' in page and "<td>-</td>" in page  # undefined: a dash
    assert "grids/colour-short-feedback.png" in page and "short prompts: rich feedback" in page
    flat = flat_metrics(metrics)
    assert flat["eval/short/feedback/preference_same_prompt_auc"] == 0.73
    assert flat["eval/short/feedback/missed_words_precision"] == 0.5
    assert "eval/short/feedback/missed_words_recall" not in flat  # undefined: not logged


def test_reference_clip_loads_local_weights_through_the_full_path(tmp_path):
    """`full` names an open_clip model and a weights file; here a random tiny model saved
    locally stands in for ViT-B/32 and is loaded through the same code, untrained."""
    model = create_clip(TINY_MODEL)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    cfg = ReferenceClipConfig(pretrained=str(weights), eval_images=8)
    metrics = train_reference_clip(cfg, tmp_path / "ref")
    assert metrics["trained"] is False and metrics["context_length"] == 77
    loaded = load_reference_clip(tmp_path / "ref")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert json.loads((tmp_path / "ref" / "reference_clip.json").read_text())["pretrained"]

    images = render_scenes(HAND_MADE[:2], 32)
    long = "a red circle " * 40
    scores = loaded.score(images, ["a red circle", long])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
    assert loaded.truncated(["a red circle", long]) == [False, True]
    assert open_clip.get_tokenizer(TINY_MODEL).context_length == 77

    with pytest.raises(MissingWeightsError, match="No model hub is reachable"):
        train_reference_clip(
            ReferenceClipConfig(pretrained=str(tmp_path / "absent.bin")), tmp_path / "x"
        )


def test_hps_v2_loads_a_local_checkpoint_or_says_how_to_provide_one(tmp_path):
    """HPS v2 ships as a torch file holding {"state_dict": ...} for open_clip ViT-H-14; a
    random tiny open_clip model saved the same way stands in for it, read with
    weights_only=True through the same code."""
    from models.evaluation.preference_scores import hps_v2_scores

    images = render_scenes(HAND_MADE[:2], 32)
    texts = ["a red circle and a blue square", "a yellow star"]
    skipped = hps_v2_scores(None, "ViT-H-14", images, texts)
    assert "eval_report.hpsv2" in skipped["skipped"]
    missing = hps_v2_scores(str(tmp_path / "HPS_v2_compressed.pt"), "ViT-H-14", images, texts)
    assert "does not exist" in missing["skipped"]

    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": create_clip(TINY_MODEL).state_dict()}, ckpt)
    scored = hps_v2_scores(str(ckpt), TINY_MODEL, images, texts)
    assert len(scored["per_image"]) == 2 and -1.0 <= scored["mean"] <= 1.0
    assert scored["version"] == "hpsv2.0"  # from the released file name
    unnamed = tmp_path / "my_scorer.pt"
    unnamed.write_bytes(ckpt.read_bytes())
    assert "v2.0 or v2.1" in hps_v2_scores(str(unnamed), TINY_MODEL, images, texts)["skipped"]
