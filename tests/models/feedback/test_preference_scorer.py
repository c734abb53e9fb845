"""The preference model's scorer and its reprompted pairs, on hand-made pools."""

import numpy as np
import pytest
import torch

from corpus.prompt_suite import Prompt, build_suite, condition_holds, stated_conditions
from corpus.world import Scene, SceneObject
from models.feedback.judge_scorer import GROUPS
from models.feedback.pool import Pool, PoolConfig
from models.feedback.reprompt import new_prompts, reprompted_pairs
from models.feedback.utility import UtilityConfig

SUITE = build_suite(16)
RED_STAR = Scene((SceneObject("star", "red", "large", 1, 1),), "gray")
BLUE_CIRCLE = Scene((SceneObject("circle", "blue", "small", 0, 2),), "white")


def _pool(test_prompt: Prompt) -> Pool:
    """Two training prompts and one test prompt; images of a red star and a blue circle,
    the star drawn cleanly, the circle as a smudge; one generator held out."""
    rows = []
    for gen in ("m/ema/g3", "m/ema/g1"):
        for prompt in (0, 1, 2):
            for scene, err in ((RED_STAR, 0.0), (BLUE_CIRCLE, 0.25)):
                rows.append(
                    {
                        "generator": gen,
                        "prompt": prompt,
                        "conditions": [True],
                        "cell_error": [err] * 9,
                        "scene": scene.to_dict(),
                    }
                )
    star, circle = (next(p for p in SUITE if p.short == t) for t in ("a star", "a circle"))
    prompts = [
        {"text": "a star", "split": "train", "prompt": star.to_dict()},
        {"text": "a circle", "split": "train", "prompt": circle.to_dict()},
        {"text": test_prompt.short, "split": "test", "prompt": test_prompt.to_dict()},
    ]
    images = torch.zeros(len(rows), 3, 32, 32, dtype=torch.uint8)
    return Pool(images, rows, [""] * len(rows), {}, prompts, 0.01, PoolConfig())


def test_reprompted_pairs_hold_images_to_the_new_prompt_and_never_ask_a_kept_out_one():
    drawn = [p for p, _ in new_prompts(3, seed=5, kept_out=[])]
    test_prompt, suite_prompt = drawn[0], drawn[-1]
    pool = _pool(test_prompt)
    r = reprompted_pairs(pool, 200, per_category=3, seed=5, kept_out=[suite_prompt])
    prompts = {p.text(f): (p, f) for p, f in new_prompts(3, 5, [test_prompt, suite_prompt])}
    asked = {frozenset(prompts[t][0].conditions) for t in r.texts}
    assert frozenset(test_prompt.conditions) not in asked
    assert frozenset(suite_prompt.conditions) not in asked
    assert len(r.texts) < len(drawn)
    # Only training images of generators not held out: the first 4 rows; never a = b.
    assert set(r.a) | set(r.b) <= {0, 1, 2, 3} and not (r.a == r.b).any()
    for k in range(len(r.a)):
        conds = stated_conditions(*prompts[r.texts[r.prompt[k]]])  # what its text says
        for side, image in enumerate((r.a[k], r.b[k])):
            scene = Scene.from_dict(pool.labels[image]["scene"])
            held = [condition_holds(c, scene) for c in conds]
            assert r.alignment[k, side] == pytest.approx(np.mean(held))
            assert r.composition[k, side] == float(all(held))
    # Half the first images are among the best for their prompt: more often aligned.
    assert r.alignment[:, 0].mean() > r.alignment[:, 1].mean()


def test_alike_reprompted_pairs_hold_the_prompt_equally():
    """reprompt_alike_share: that share of pairs shows two images holding the new prompt
    alike (only plausibility can decide them); at 0 the pairs are those drawn before."""
    pool = _pool(next(p for p in SUITE if p.short == "a triangle"))
    alike = reprompted_pairs(pool, 300, per_category=3, seed=1, alike_share=1.0)
    # Each training scene is drawn twice, so every pair can be alike, and is.
    assert np.array_equal(alike.alignment[:, 0], alike.alignment[:, 1])
    assert np.array_equal(alike.composition[:, 0], alike.composition[:, 1])
    assert not (alike.a == alike.b).any()
    none, default = (
        reprompted_pairs(pool, 2000, per_category=3, seed=1, alike_share=0.0),
        reprompted_pairs(pool, 2000, per_category=3, seed=1),
    )
    assert np.array_equal(none.b, default.b) and np.array_equal(none.a, default.a)
    half = reprompted_pairs(pool, 2000, per_category=3, seed=1, alike_share=0.5)

    def unequal(r):
        return (r.alignment[:, 0] != r.alignment[:, 1]).mean()

    assert 0 < unequal(half) < 0.7 * unequal(none)


def test_reprompted_choices_follow_the_utility_the_annotators_hold():
    pool = _pool(next(p for p in SUITE if p.short == "a triangle"))
    r = reprompted_pairs(pool, 300, per_category=3, seed=1)
    # tau small: the annotator picks the higher utility. Plausibility: the star is clean.
    plaus = {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}
    p_a, p_b = np.array([plaus[i] for i in r.a]), np.array([plaus[i] for i in r.b])
    full = r.choices(pool, UtilityConfig(), seed=0)
    u_a = r.alignment[:, 0] + p_a + 0.5 * r.composition[:, 0]
    u_b = r.alignment[:, 1] + p_b + 0.5 * r.composition[:, 1]
    decided = u_a != u_b
    assert decided.sum() > 50
    assert np.array_equal(full[decided], (u_a > u_b)[decided].astype(int))
    # Annotators who do not value plausibility choose by the prompt alone.
    no_p = r.choices(pool, UtilityConfig().without("plausibility"), seed=0)
    u_a, u_b = u_a - p_a, u_b - p_b
    decided = u_a != u_b
    assert np.array_equal(no_p[decided], (u_a > u_b)[decided].astype(int))


def test_a_saved_scorer_loads_back_and_reads_the_prompt(tmp_path):
    from models.evaluation.world_judge import JudgeConfig, JudgeNet, render_scenes
    from models.feedback.judge_scorer import JudgeScorer, load_scorer, save_scorer

    torch.manual_seed(0)
    scorer = JudgeScorer(JudgeNet(32, 8), 32, width=16, context_length=16).eval()
    images = render_scenes([RED_STAR, BLUE_CIRCLE], 32)
    texts = ["a red star", "a blue circle"]
    before = scorer.preference(images, texts)
    save_scorer(scorer, JudgeConfig(resolution=32, width=8), tmp_path / "pref")
    loaded = load_scorer(tmp_path / "pref")
    assert np.allclose(loaded.preference(images, texts), before, atol=1e-6)
    # The score is of an image against a text: another text gives another score.
    assert not np.allclose(loaded.preference(images, texts[::-1]), before)
    with pytest.raises(FileNotFoundError, match="no preference scorer"):
        load_scorer(tmp_path / "missing")
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        loaded.preference(images, texts[:1])


def test_new_prompts_are_suite_prompts_from_their_own_seed():
    a, b = new_prompts(2, seed=3, kept_out=[]), new_prompts(2, seed=3, kept_out=[])
    assert [p.text(f) for p, f in a] == [p.text(f) for p, f in b]
    assert {f for _, f in a} == {"short", "descriptive"}
    assert {p.category for p, _ in a} == {p.category for p in build_suite(1)}


def test_the_reading_shows_a_smudge_in_the_cell_where_it_is(tmp_path):
    """A smudge the class reading might still call a star changes the plausibility
    head's inputs (feature and pixel statistics) most in its own cell."""
    from torch.nn import functional as F

    from models.evaluation.world_judge import JudgeConfig, JudgeNet, render_scenes
    from models.feedback.judge_scorer import (
        READING,
        JudgeScorer,
        cell_statistics,
        load_scorer,
        save_scorer,
    )

    torch.manual_seed(0)
    scorer = JudgeScorer(JudgeNet(32, 8), 32, width=16, context_length=16).eval()
    corner = Scene((SceneObject("star", "red", "large", 0, 2),), "gray")  # row 0, column 2
    clean = render_scenes([corner], 32)
    smudged = clean.clone()
    smudged[:, :, 2:8, 24:30] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    stats = scorer.read(torch.cat([clean, smudged]))[:, :, 2 * READING :]
    assert (stats[0] - stats[1]).abs().amax(-1).argmax() == 2
    # Pixel statistics (the last 9 per cell) are cell-exact: no other cell's changed.
    pixels, others = stats[..., -9:], [0, 1, 3, 4, 5, 6, 7, 8]
    assert torch.equal(pixels[0, others], pixels[1, others])
    assert not torch.equal(pixels[0, 2], pixels[1, 2])
    # Cells in the judge's own order (row-major, as its pooled class maps).
    maps = torch.randn(2, 4, 9, 12)
    assert torch.allclose(
        cell_statistics(maps)[..., :4], F.adaptive_avg_pool2d(maps, 3).flatten(2).mT
    )
    assert torch.equal(cell_statistics(maps)[..., 8:], F.adaptive_max_pool2d(maps, 3).flatten(2).mT)
    with pytest.raises(ValueError, match="does not split into 3x3"):
        cell_statistics(torch.zeros(1, 2, 10, 9))
    # A scorer saved with another reading is refused by name, not by a shape mismatch.
    narrow = JudgeScorer(JudgeNet(32, 8), 32, width=16, context_length=16)
    narrow.plausibility[0] = torch.nn.LayerNorm(7)
    narrow.plausibility[1] = torch.nn.Linear(7, 16)
    save_scorer(narrow, JudgeConfig(resolution=32, width=8), tmp_path / "old")
    with pytest.raises(ValueError, match="saved by another version"):
        load_scorer(tmp_path / "old")


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_dropout_key_reaches_the_scorers_layers(dropout):
    """preference_model.dropout: at the default 0 a training-mode score repeats; above 0
    the layers drop."""
    from models.evaluation.world_judge import JudgeNet
    from models.feedback.judge_scorer import JudgeScorer, reading_width
    from models.feedback.preference import PreferenceConfig

    pcfg = PreferenceConfig.from_dict({"width": 16, "context_length": 16, "dropout": dropout})
    assert PreferenceConfig().dropout == 0.0
    torch.manual_seed(0)
    judge = JudgeNet(32, 8)
    scorer = JudgeScorer(judge, 32, pcfg.width, pcfg.context_length, pcfg.dropout).train()
    reading = torch.randn(4, 9, reading_width(judge))
    ids = scorer.token_ids(["a red star", "two blue circles", "a cat", "a green square"])
    first, second = scorer(reading, ids), scorer(reading, ids)
    assert torch.equal(first, second) == (dropout == 0.0)


def test_alignment_reads_the_scene_the_judge_decodes(tmp_path):
    """Two images the judge decodes as one scene give the alignment head one input, however
    sure the judge is of it; the input is the scene `WorldJudge.predict` returns (colour and
    size only where there is an object, one word at most). A scorer saved when alignment
    read probabilities is refused."""
    import json

    from models.evaluation.world_judge import (
        BACKGROUND_CLASSES,
        CELLS,
        COLOUR_CLASSES,
        SHAPE_CLASSES,
        SIZES,
        WORD_CLASSES,
        JudgeConfig,
        JudgeNet,
        _decode_scenes,
    )
    from models.feedback.judge_scorer import (
        CONFIG,
        GROUPS,
        JudgeScorer,
        load_scorer,
        reading_width,
        save_scorer,
        scene_reading,
    )

    offsets = np.cumsum([0, *GROUPS])

    def expected(scene: Scene) -> torch.Tensor:
        out = torch.zeros(9, sum(GROUPS) + len(BACKGROUND_CLASSES))
        for i, cell in enumerate(CELLS):
            obj = next((o for o in scene.objects if (o.row, o.col) == cell), None)
            out[i, SHAPE_CLASSES.index(obj.shape) if obj else 0] = 1
            if obj:
                out[i, offsets[1] + COLOUR_CLASSES.index(obj.color)] = 1
                out[i, offsets[2] + SIZES.index(obj.size)] = 1
            word = scene.word if cell == (scene.word_row, scene.word_col) else None
            out[i, offsets[3] + (WORD_CLASSES.index(word) if word else 0)] = 1
            out[i, offsets[4] + BACKGROUND_CLASSES.index(scene.background)] = 1
        return out

    g = torch.Generator().manual_seed(0)
    logits = {
        "shape": torch.randn(64, 9, GROUPS[0], generator=g) * 3,
        "colour": torch.randn(64, 9, GROUPS[1], generator=g),
        "size": torch.randn(64, 9, GROUPS[2], generator=g),
        "word": torch.randn(64, 9, GROUPS[3], generator=g) * 3,
        "background": torch.randn(64, len(BACKGROUND_CLASSES), generator=g),
    }
    logits["word"][:32, :, 0] += 8  # half the images: no cell sure of a word
    scenes = _decode_scenes(logits)
    assert any(s.word for s in scenes) and any(not s.word for s in scenes)
    assert any(len(s.objects) < 9 for s in scenes)
    bg = logits["background"][:, None].expand(-1, 9, -1)
    parts = [logits[k] for k in ("shape", "colour", "size", "word")] + [bg]
    probs = torch.cat([p.softmax(-1) for p in parts], -1)
    assert torch.equal(scene_reading(probs), torch.stack([expected(s) for s in scenes]))
    # A judge twice as sure of every class it reads gives the same input wherever it
    # decodes the same scene (the word's cell may cross even odds).
    sure = torch.cat([(2 * p).softmax(-1) for p in parts], -1)
    sharper = _decode_scenes({k: 2 * v for k, v in logits.items()})
    same = [s == t for s, t in zip(scenes, sharper, strict=True)]
    assert 0 < sum(same) < len(same)
    assert torch.equal(scene_reading(sure)[same], scene_reading(probs)[same])

    scorer = JudgeScorer(JudgeNet(32, 8), 32, width=16, context_length=16)
    save_scorer(scorer, JudgeConfig(resolution=32, width=8), tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / CONFIG).read_text())
    del cfg["reading"]  # as scorers saved before alignment read the scene
    (tmp_path / "old" / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\(probabilities\).*saved by another version"):
        load_scorer(tmp_path / "old")
    cfg["reading"] = "scene"  # as scorers whose alignment also read sizes and background
    (tmp_path / "old" / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\(scene\).*saved by another version"):
        load_scorer(tmp_path / "old")

    # No condition names a size or a background: the alignment term does not see them.
    reading = torch.zeros(2, 9, reading_width(scorer.judge))
    reading[:, :, : sum(GROUPS) + len(BACKGROUND_CLASSES)] = scene_reading(probs[:2])
    text, mask = scorer.encode_text(scorer.token_ids(["a red star", "a red star"]))
    other = reading.clone()
    other[0, :, offsets[2] : offsets[3]] = other[0, :, offsets[2] : offsets[3]].roll(1, -1)
    other[:, :, offsets[4] :] = other[:, :, offsets[4] :].roll(1, -1)
    assert torch.equal(
        scorer.alignment_score(reading, text, mask), scorer.alignment_score(other, text, mask)
    )
    other[1, :, offsets[1] : offsets[2]] = other[1, :, offsets[1] : offsets[2]].roll(1, -1)
    moved = scorer.alignment_score(other, text, mask) != scorer.alignment_score(reading, text, mask)
    assert moved.tolist() == [False, True]


def test_an_object_of_a_shape_the_prompt_does_not_name_changes_no_stated_condition():
    """`unnamed_invariance` rests on this: every condition a prompt's text states names its
    shapes, so an object of a shape the text does not name changes none of them (in either
    form); `add_unnamed_object` adds such an object to an empty cell without a word of the
    decoded scene and changes nothing else."""
    import random

    from corpus.prompt_suite import FORMS
    from corpus.world import COLORS, WorldConfig, sample_scene
    from models.evaluation.world_judge import CELLS, SHAPE_CLASSES
    from models.feedback.judge_scorer import READING, add_unnamed_object, named_shapes

    rng, checked = random.Random(0), 0
    for prompt in SUITE:
        for form in FORMS:
            stated = stated_conditions(prompt, form)
            named = named_shapes([prompt.text(form)])[0]
            shapes = {s for c in stated for s in (c.shape, c.other_shape) if s}
            assert all(named[SHAPE_CLASSES.index(s)] for s in shapes), prompt.text(form)
            unnamed = [s for i, s in enumerate(SHAPE_CLASSES) if i and not named[i]]
            for _ in range(4):
                scene = sample_scene(rng, WorldConfig())
                taken = {(o.row, o.col) for o in scene.objects} | {(scene.word_row, scene.word_col)}
                free = [c for c in CELLS if c not in taken]
                if not free or not unnamed:
                    continue
                extra = SceneObject(
                    rng.choice(unnamed), rng.choice(tuple(COLORS)), "small", *rng.choice(free)
                )
                more = Scene(
                    (*scene.objects, extra),
                    scene.background,
                    scene.word,
                    scene.word_row,
                    scene.word_col,
                )
                held = [condition_holds(c, scene) for c in stated]
                assert [condition_holds(c, more) for c in stated] == held, (
                    prompt.text(form),
                    extra,
                )
                checked += 1
    assert checked > 200

    no_word = sum(GROUPS[:3])
    reading = torch.zeros(3, 9, READING)
    reading[..., 0] = 1.0  # every cell empty
    reading[..., no_word] = 1.0  # and without a word
    reading[:, 4, 0], reading[:, 4, SHAPE_CLASSES.index("star")] = 0.0, 1.0  # a star
    reading[2, :, no_word], reading[2, :, no_word + 1] = 0.0, 1.0  # row 2: a word everywhere
    named = named_shapes(
        [
            "a star",
            "a star and a circle and a square and a triangle and a "
            "diamond and a hexagon and a cross",
            "a star",
        ]
    )
    out = add_unnamed_object(reading, named, torch.Generator().manual_seed(0))
    changed = (out != reading).any(-1)
    assert changed[0].sum() == 1 and not changed[0, 4]  # one empty cell, not the star's
    cell = int(changed[0].nonzero()[0, 0])
    new_shape = SHAPE_CLASSES[int(out[0, cell, : GROUPS[0]].argmax())]
    assert new_shape not in ("empty", "star")
    assert (
        out[0, cell, : GROUPS[0]].sum() == 1
        and out[0, cell, GROUPS[0] : sum(GROUPS[:2])].sum() == 1
    )
    assert not changed[1].any()  # the prompt names every shape
    assert not changed[2].any()  # no empty cell without a word


def _tiny_scorer_and_batch():
    """A scorer over a random judge, and a batch of four pairs of random readings."""
    from models.evaluation.world_judge import JudgeNet
    from models.feedback.judge_scorer import JudgeScorer, named_shapes, reading_width

    torch.manual_seed(0)
    judge = JudgeNet(32, 8)
    scorer = JudgeScorer(judge, 32, 16, 16)
    texts = ["a red star", "two blue circles", "a cross left of a star", 'the word "TOY"']
    reading = torch.randn(4, 9, reading_width(judge))
    batch = {
        "a": reading,
        "b": reading.flip(0),
        "ids": scorer.token_ids(texts),
        "named": named_shapes(texts),
        "choice": torch.tensor([1, 0, 1, 0]),
    }
    return scorer, batch


def test_the_unnamed_invariance_adds_the_alignment_drift_to_the_loss():
    """preference_model.unnamed_invariance: the training loss is the pairs' cross-entropy
    plus that weight times how far the alignment term moves when an unnamed object is
    added; at 0 it is the cross-entropy alone."""
    from models.feedback.judge_scorer import READING
    from models.feedback.preference import PreferenceConfig, PreferenceModule

    scorer, batch = _tiny_scorer_and_batch()
    reading = batch["a"]
    reading[..., :READING] = 0.0
    reading[..., 0] = 1.0  # empty cells
    reading[..., sum(GROUPS[:3])] = 1.0  # without a word
    batch["b"] = reading.flip(0)
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        module = PreferenceModule(scorer, PreferenceConfig(unnamed_invariance=weight))
        module.log = module.log_dict = lambda *a, **k: None
        torch.manual_seed(1)  # the same added objects each time
        losses[weight] = float(module.training_step(batch, 0))
    drift = losses[1.0] - losses[0.0]
    assert drift > 0
    assert losses[3.0] - losses[0.0] == pytest.approx(3 * drift, rel=1e-4)


def test_alignment_first_trains_alignment_alone_then_only_plausibility_moves():
    """preference_model.alignment_first_steps: the first phase scores a pair by alignment
    alone (cross-entropy on pairs that hold the prompt differently, the squared gap on
    pairs that hold it alike, weighted by alignment_ties); the second trains plausibility
    and how loud alignment is, every other alignment weight frozen where the first left it."""
    from models.feedback.preference import PreferenceConfig, PreferenceModule

    scorer, batch = _tiny_scorer_and_batch()
    batch["tied"] = torch.tensor([False, False, True, True])
    cfg = PreferenceConfig(unnamed_invariance=0.0, alignment_ties=2.0)
    module = PreferenceModule(scorer, cfg, "alignment")
    module.log = module.log_dict = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        text = scorer.encode_text(batch["ids"])
        a, b = (scorer.alignment_score(batch[k], *text) for k in ("a", "b"))
    ce = torch.nn.functional.cross_entropy(torch.stack([a, b], 1)[:2], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((ce + 2.0 * (a[2:] - b[2:]).square().mean()).item())

    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    module = PreferenceModule(scorer, cfg, "plausibility")
    module.log = module.log_dict = lambda *a, **k: None
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module.training_step(batch, 0).backward()
    opt.step()
    moved = {k for k, v in scorer.state_dict().items() if not torch.equal(v, before[k])}
    assert "alignment_gain" in moved
    assert all(k.startswith("plausibility.") or k == "alignment_gain" for k in moved)
