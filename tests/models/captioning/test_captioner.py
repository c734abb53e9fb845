from __future__ import annotations

import itertools
import json
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from corpus.caption_metrics import word_cells
from corpus.scene_text import descriptive_caption, scene_word_cell
from corpus.world import COLORS, SHAPES, SIZES, WORDS, WorldConfig, sample_scene
from models.captioning.captioner import GenerationConfig, PrefixCaptioner
from models.captioning.concepts import (
    CELL_CLASSES,
    CELL_HEADS_FILE,
    IGNORE,
    cell_targets,
    word_targets,
)
from models.captioning.train import PHASES, train_captioner, training_precision, with_mirrors
from models.common.data import load_images
from models.common.tokenizer import load_tokenizer
from tests.models.conftest import tiny_captioner_config


def test_every_phase_leaves_a_safetensors_checkpoint_and_quality(tiny_captioner):
    for phase in PHASES:
        assert (tiny_captioner / phase / "model.safetensors").exists(), phase
        assert not list((tiny_captioner / phase).glob("*.ckpt")) and not list(
            (tiny_captioner / phase).glob("*.pt")
        )
    metrics = json.loads((tiny_captioner / "metrics.json").read_text())
    assert set(metrics["quality"]) == {"alt_text", "short_caption", "descriptive_caption"}
    for name, kinds in metrics["quality"].items():
        assert 0.0 <= kinds["overall"]["hallucination_rate"] <= 1.0, name
    assert len(metrics["samples"]["descriptive_caption"]) == 16


def test_concepts_phase_trains_the_image_tower_only(tiny_captioner):
    before = load_file(tiny_captioner / "clip" / "model.safetensors")
    after = load_file(tiny_captioner / "concepts" / "model.safetensors")
    assert before.keys() == after.keys()
    text = [k for k in before if not k.startswith("visual.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_word_targets_mark_each_caption_token_once(tiny_captioner):
    tok = load_tokenizer(tiny_captioner / "tokenizer")
    targets = word_targets(tok, ["a red circle and a red square", ""])
    ids = tok("a red circle and a red square", add_special_tokens=False)["input_ids"]
    assert targets.shape == (2, len(tok))
    assert targets[0].nonzero().flatten().tolist() == sorted(set(ids))
    assert targets[1].sum() == 0
    assert targets[:, tok.all_special_ids].sum() == 0


def test_cell_targets_place_what_each_caption_places():
    targets = cell_targets(
        [
            "A gray background with a small red star in the top left and two blue circles "
            'in the center and the bottom right. The text "CAT" appears in the top right.',
            "a square in the bottom center",  # colour unstated: ignored, not "nothing"
            "",
        ]
    )
    shapes, colours, sizes = (targets[f"cell_{k}"] for k in ("shapes", "colours", "sizes"))
    star, circle, square = (SHAPES.index(s) + 1 for s in ("star", "circle", "square"))
    red, blue = (list(COLORS).index(c) + 1 for c in ("red", "blue"))
    assert shapes[0].tolist() == [star, 0, 0, 0, circle, 0, 0, 0, circle]
    assert colours[0].tolist() == [red, 0, 0, 0, blue, 0, 0, 0, blue]
    small, n = SIZES.index("small"), IGNORE  # the circles' size is not stated
    assert sizes[0].tolist() == [small, n, n, n, n, n, n, n, n]
    assert shapes[1, 7] == square and colours[1, 7] == IGNORE
    assert shapes[2].sum() == 0 and colours[2].sum() == 0
    cat = WORDS.index("CAT") + 1
    assert targets["cell_words"][0].tolist() == [0, 0, cat, 0, 0, 0, 0, 0, 0]
    assert targets["cell_words"][1:].sum() == 0


def test_word_cells_read_every_template_of_the_descriptive_caption():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng, WorldConfig(word_prob=1.0))
        caption = descriptive_caption(scene, rng)
        assert word_cells(caption) == [(scene.word, scene_word_cell(scene))], caption
        seen.add(caption.split('"')[0][-12:])
    assert len(seen) >= 3  # the three word sentences were all drawn
    # "the center left" is not read as "the center"; an unknown or second word is no target
    assert word_cells('In the center left it says "SUN".') == [("SUN", "center left")]
    assert word_cells('The word "HELLO" is written in the center.') == []
    assert word_cells('The word "CAT" or "DOG" is written in the center.') == []


def test_concept_loss_stays_finite_when_a_batch_states_no_size(tiny_captioner, tiny_raw):
    import pandas as pd

    from models.captioning.concepts import ConceptModule

    tok = load_tokenizer(tiny_captioner / "tokenizer")
    module = ConceptModule(
        "recapflow-tiny-cell-clip", str(tiny_captioner / "clip" / "model.safetensors"), len(tok)
    )
    module.log_dict = lambda *a, **k: None  # no trainer attached
    index = pd.read_parquet(tiny_raw / "index.parquet").head(4)
    targets = cell_targets(["a red star in the top left"] * 4)  # no size stated
    batch = {
        "images": load_images(tiny_raw, list(index["key"]), list(index["shard"]), 48),
        "targets": word_targets(tok, ["a red star"] * 4),
        **targets,
    }
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert module.cell_heads["shapes"].weight.grad.abs().sum() > 0
    assert module.cell_heads["sizes"].weight.grad.abs().sum() == 0


def test_checkpoint_round_trip_gives_the_same_captions(tiny_captioner, tiny_raw):
    import pandas as pd

    index = pd.read_parquet(tiny_raw / "index.parquet").head(8)
    images = load_images(tiny_raw, list(index["key"]), list(index["shard"]), 64)
    a = PrefixCaptioner.load(tiny_captioner / "dsc")
    b = PrefixCaptioner.load(tiny_captioner / "dsc")
    gen = GenerationConfig(mode="greedy", max_new_tokens=10)
    assert a.generate(images, gen) == b.generate(images, gen)
    for mode in ("beam", "nucleus"):
        caps = a.generate(images, GenerationConfig(mode=mode, max_new_tokens=10, num_beams=2))
        assert len(caps) == 8 and all(isinstance(c, str) for c in caps)
    # A minimum length holds even for this barely trained model.
    tok = load_tokenizer(tiny_captioner / "tokenizer")
    forced = a.generate(images, GenerationConfig(max_new_tokens=10, min_new_tokens=4))
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) >= 2 for c in forced), forced
    # Batched and one-at-a-time greedy decoding agree.
    one_by_one = [a.generate(images[i : i + 1], gen)[0] for i in range(4)]
    assert one_by_one == a.generate(images[:4], gen)


def test_finished_phases_are_skipped_on_rerun(tiny_captioner, tiny_raw):
    stamps = {p: (tiny_captioner / p / "model.safetensors").stat().st_mtime_ns for p in PHASES}
    t0 = time.time()
    train_captioner(tiny_captioner_config(), tiny_raw, tiny_captioner)
    for p, st in stamps.items():
        assert (tiny_captioner / p / "model.safetensors").stat().st_mtime_ns == st, p
    assert time.time() - t0 < 60


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="generation mode"):
        GenerationConfig(mode="sampling")
    with pytest.raises(ValueError, match=r"captioner\.learning_rate: unknown key"):
        tiny_captioner_config(learning_rate=1.0)


def test_weights_files_are_not_pickles(tiny_captioner):
    from safetensors.torch import load_file

    state = load_file(tiny_captioner / "dsc" / "model.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_a_convolutional_tower_feeds_the_prefix_through_its_feature_map(tiny_captioner):
    """Any open_clip tower works: a ModifiedResNet gives its last feature map as tokens."""
    from models.captioning.captioner import CaptionerSpec
    from models.common.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_captioner / "tokenizer")
    lm = {"config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}}
    model = PrefixCaptioner.build(CaptionerSpec("recapflow-tiny-rn-clip", lm, prefix_grid=3), tok)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.prefix(images).shape == (2, 1 + 9, 32)
    ids = torch.tensor([[5, 6, tok.eos_token_id], [7, tok.eos_token_id, tok.pad_token_id]])
    loss = model(images, ids, (ids != tok.pad_token_id).long())
    loss.backward()
    assert model.visual.conv1.weight.grad is not None
    assert len(model.generate(images, GenerationConfig(max_new_tokens=4))) == 2


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_visual_lr_scale_slows_or_freezes_the_image_tower(tiny_captioner, scale):
    from models.captioning.train import CaptionerModule, PhaseConfig

    model = PrefixCaptioner.load(tiny_captioner / "pretrain").train()
    module = CaptionerModule(model, "dsc", PhaseConfig(lr=1e-3, visual_lr_scale=scale))
    opt = module.configure_optimizers()["optimizer"]
    visual = {id(p) for p in model.visual.parameters()}
    # initial_lr: the peak the warmup/cosine schedule scales.
    groups = opt.param_groups
    lrs = {g["initial_lr"] for g in groups if any(id(p) in visual for p in g["params"])}
    if scale == 0.0:
        assert lrs == set() and not any(p.requires_grad for p in model.visual.parameters())
    else:
        assert list(lrs) == [pytest.approx(1e-4)]
    lm_lrs = {g["initial_lr"] for g in groups if not any(id(p) in visual for p in g["params"])}
    assert lm_lrs == {1e-3}


def test_prefix_slots_carry_their_own_position_and_old_checkpoints_still_load(
    tiny_captioner, tiny_raw, tmp_path
):
    """Each prefix slot (pooled embedding, then the grid cells) gets its own learned
    embedding, so the LM can tell which cell a token describes; a captioner saved before
    those embeddings existed loads without them and captions as it did."""
    import pandas as pd

    from models.captioning.captioner import CaptionerSpec

    model = PrefixCaptioner.load(tiny_captioner / "dsc")
    assert model.prefix_pos is not None and model.prefix_pos.shape == (1 + 9, 32)
    # Two slots showing the same content still differ by their position embedding.
    assert torch.cdist(model.prefix_pos, model.prefix_pos).fill_diagonal_(1.0).min() > 0.5

    spec = CaptionerSpec(**{**vars(model.spec), "prefix_positions": False})
    old = PrefixCaptioner.build(spec, model.tokenizer).eval()
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "captioner.json").read_text())
    del meta["spec"]["prefix_positions"]  # as written by the earlier code
    (tmp_path / "old" / "captioner.json").write_text(json.dumps(meta))
    loaded = PrefixCaptioner.load(tmp_path / "old")
    assert loaded.prefix_pos is None
    index = pd.read_parquet(tiny_raw / "index.parquet").head(4)
    images = load_images(tiny_raw, list(index["key"]), list(index["shard"]), 64)
    gen = GenerationConfig(max_new_tokens=8)
    assert loaded.generate(images, gen) == old.generate(images, gen)


def test_the_captioner_keeps_the_concept_heads_frozen(tiny_captioner):
    """The `concepts` phase's per-cell heads travel with the captioner, unchanged by every
    captioning phase, and no optimizer ever gets them."""
    from models.captioning.train import CaptionerModule, PhaseConfig

    saved = load_file(tiny_captioner / "concepts" / CELL_HEADS_FILE)
    model = PrefixCaptioner.load(tiny_captioner / "dsc")
    assert model.spec.concept_heads == CELL_CLASSES
    state = model.cell_heads.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # pretrain, ssc, dsc kept them
    module = CaptionerModule(model.train(), "dsc", PhaseConfig(visual_lr_scale=1.0))
    groups = module.configure_optimizers()["optimizer"].param_groups
    trainable = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trainable for p in model.cell_heads.parameters())


def test_a_tower_trained_after_the_concepts_phase_drops_the_heads(
    tiny_captioner, tiny_raw, tmp_path
):
    """Heads that read another tower than the one they were trained on verify nothing."""
    import shutil

    cfg = tiny_captioner_config(dsc={"max_steps": 2, "batch_size": 16, "visual_lr_scale": 0.1})
    out = tmp_path / "captioner"
    shutil.copytree(tiny_captioner, out)
    for phase in ("pretrain", "ssc", "dsc"):  # the rest is reused
        shutil.rmtree(out / phase)
    for phase in ("tokenizer", "clip", "concepts"):
        done = json.loads((out / phase / "done.json").read_text())
        (out / phase / "done.json").write_text(
            json.dumps({**done, "config": cfg.training_digest()})
        )
    train_captioner(cfg, tiny_raw, out)
    model = PrefixCaptioner.load(out / "dsc")
    assert model.spec.concept_heads is None and model.cell_heads is None


def test_the_concept_heads_verify_candidate_captions():
    """Reranking keeps, per image, the candidate whose claims the scene the concept heads
    see contradicts least, the better-scored (earlier) one on a tie."""
    from models.captioning.concepts import contradictions, most_consistent, predicted_scenes

    logits = {k: torch.full((1, 9, len(v)), -9.0) for k, v in CELL_CLASSES.items()}
    logits["shapes"][0, :, 0] = 9.0  # nothing anywhere ...
    logits["shapes"][0, 0, 1 + SHAPES.index("circle")] = 9.0  # ... but a circle top left
    logits["shapes"][0, 0, 0] = -9.0
    logits["colours"][0, 0, 0] = 9.0  # "nothing" is never an object's colour
    logits["colours"][0, 0, 1 + list(COLORS).index("red")] = 5.0
    logits["sizes"][0, :, SIZES.index("small")] = 9.0
    logits["words"][0, :, 0] = 9.0
    logits["words"][0, 8, 0], logits["words"][0, 8, 1 + WORDS.index("CAT")] = -9.0, 9.0
    (scene,) = predicted_scenes(logits)
    assert [(o.color, o.shape, o.size, o.cell) for o in scene.objects] == [
        ("red", "circle", "small", "top left")
    ]
    assert (scene.word, scene.word_row, scene.word_col) == ("CAT", 2, 2)

    right = 'A small red circle in the top left on a gray background. It says "CAT".'
    wrong_cell = "A small red circle in the top right on a gray background."
    wrong_both = "Two blue squares in the center."
    assert contradictions(right, scene) == 0  # the background is not checked
    assert contradictions(wrong_cell, scene) == 1
    assert contradictions(wrong_both, scene) >= 3
    assert most_consistent([[wrong_both, wrong_cell], [wrong_cell, right]], [scene, scene]) == [
        wrong_cell,
        right,
    ]
    assert most_consistent([[right, right + " "]], [scene]) == [right]


def test_candidate_generation_needs_a_search_and_concept_heads(tiny_captioner, tiny_raw, tmp_path):
    import pandas as pd

    from models.captioning.captioner import CaptionerSpec

    with pytest.raises(ValueError, match="candidates=2"):
        GenerationConfig(mode="greedy", candidates=2)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(mode="beam", num_beams=2, candidates=3)
    index = pd.read_parquet(tiny_raw / "index.parquet").head(3)
    images = load_images(tiny_raw, list(index["key"]), list(index["shard"]), 64)
    model = PrefixCaptioner.load(tiny_captioner / "dsc")
    for mode in ("beam", "nucleus"):
        gen = GenerationConfig(mode=mode, num_beams=3, candidates=3, max_new_tokens=8)
        assert len(model.generate(images, gen)) == 3
    untagged = PrefixCaptioner.build(
        CaptionerSpec(**{**vars(model.spec), "concept_heads": None}), model.tokenizer
    )
    with pytest.raises(ValueError, match="has none"):
        untagged.generate(images, GenerationConfig(mode="beam", num_beams=2, candidates=2))


def test_clause_check_charges_each_false_claim_once_as_it_is_written(tiny_captioner):
    """Fed a caption token by token, as a beam writes it, the check takes PENALTY per false
    claim, each once; a claim still being written ("in the center" before " left"), or a
    count its sentence has not finished, costs nothing until ending the caption there
    would settle it."""
    from corpus.world import Scene, SceneObject
    from models.captioning.verified_search import PENALTY, ClauseCheck

    tok = PrefixCaptioner.load(tiny_captioner / "dsc").tokenizer
    objects = (
        SceneObject("star", "red", "small", 0, 0),
        SceneObject("star", "red", "large", 1, 0),
        SceneObject("circle", "blue", "small", 2, 2),
    )
    scene = Scene(objects, "gray", "CAT", 0, 2)
    eos, other = tok.eos_token_id, tok.pad_token_id

    def charged(caption: str) -> tuple[float, float]:
        """(what writing the caption cost, what ending it then costs on top)"""
        check = ClauseCheck(tok, [scene], 1)
        ids = tok(caption, add_special_tokens=False)["input_ids"]
        total = 0.0
        for t in range(1, len(ids) + 1):
            scores = check(torch.tensor([ids[:t]]), torch.zeros(1, len(tok)))
            total += float(-scores[0, other]) / PENALTY
        return total, float(scores[0, other] - scores[0, eos]) / PENALTY

    right = (
        "A small red star in the top left, a large red star in the center left and a "
        'blue circle in the bottom right. The word "CAT" is written in the top right.'
    )
    assert charged(right) == (0, 0)  # background not checked, "center" grew into "center left"
    assert charged("A small blue circle in the top right,") == (1, 0)  # position
    assert charged("A small blue square in the top right,")[0] >= 4  # shape, colour, ...
    assert charged("A small red star in the top left,") == (0, 1)  # one red star, if it ends
    assert charged("A small red star in the top left.") == (1, 0)  # sentence over: a count
    assert charged('It says "DOG" in the top right.') == (1, 0)  # the word
    assert charged("A blue circle in the center, a") == (1, 0)  # "center" then ","
    assert charged("two red stars") == (0, 0)  # a short caption needs no full stop
    assert charged("a blue circle in the top left") == (0, 1)  # the last word, if it ends


def _reference_clause_check(tok, scenes, num_beams, input_ids, scores):
    """The check as it was first written: every text decoded and parsed from its start."""
    from corpus.caption_metrics import false_claims_by_kind
    from models.captioning.verified_search import _CLAUSE_KINDS, PENALTY, settled

    ended_kinds = (*_CLAUSE_KINDS, "count")

    def false(image, text):
        text = settled(text)
        f = false_claims_by_kind(text, scenes[image])
        done = false_claims_by_kind(text[: text.rfind(".") + 1], scenes[image])
        return sum(f[k] for k in _CLAUSE_KINDS) + done["count"]

    texts = tok.batch_decode(input_ids, skip_special_tokens=True)
    parents = tok.batch_decode(input_ids[:, :-1], skip_special_tokens=True)
    eos = tok.eos_token_id
    k = min(2 * num_beams, scores.shape[-1])
    may_end = (scores[:, eos] >= scores.topk(k, dim=-1).values[:, -1]).tolist()
    for row, (text, parent) in enumerate(zip(texts, parents, strict=True)):
        image, text, parent = row // num_beams, text.strip(), parent.strip()
        settled_false = false(image, text)
        added = settled_false - false(image, parent)
        if added > 0:
            scores[row] -= PENALTY * added
        if may_end[row]:
            ended = false_claims_by_kind(text, scenes[image])
            unsettled = sum(ended[k] for k in ended_kinds) - settled_false
            if unsettled > 0:
                scores[row, eos] -= PENALTY * unsettled
    return scores


def test_clause_check_charges_as_parsing_every_text_from_its_start_would(tiny_captioner):
    """The check carries each beam's text and parses only the sentence being written;
    fed beams of true and false captions (another scene's) whose rows swap between steps,
    as beam search reorders them, it charges exactly what re-parsing everything charges."""
    from models.captioning.verified_search import ClauseCheck

    tok = PrefixCaptioner.load(tiny_captioner / "dsc").tokenizer
    rng = random.Random(0)
    cfg = WorldConfig()
    scenes = [sample_scene(rng, cfg) for _ in range(24)]
    captions = [descriptive_caption(sc, rng) for sc in scenes]
    captions += ['It says "DOG" in the center. A small red star in the center left, two']
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in captions]
    beams, images = 4, 6
    check = ClauseCheck(tok, scenes[:images], beams)
    rows = [rng.randrange(len(ids)) for _ in range(beams * images)]
    for t in range(1, 60):
        # Each row continues some row of the last step, as beam search reorders beams.
        rows = [rows[rng.randrange(len(rows))] if rng.random() < 0.3 else r for r in rows]
        batch = torch.tensor([(ids[r] + [tok.eos_token_id] * 60)[:t] for r in rows])
        scores = torch.randn(len(rows), len(tok))
        scores[:, tok.eos_token_id] = 5.0  # ending is always among the best: checked too
        got = check(batch, scores.clone())
        want = _reference_clause_check(tok, scenes[:images], beams, batch, scores.clone())
        assert torch.equal(got, want), f"step {t}"


def test_written_out_beam_search_finds_what_transformers_beam_search_finds(tiny_captioner):
    """Recaptioning decodes with its own beam search (images leave the batch as their
    search ends, beams carry their text). On an LM that writes captions (one per prefix,
    learnt by heart) judged against scenes half of which they contradict, it returns what
    transformers' beam search returns, with and without the clause check (there a logits
    processor), and the check changes what is written."""
    from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList

    from models.captioning.beam_search import beam_search
    from models.captioning.verified_search import ClauseCheck

    tok = PrefixCaptioner.load(tiny_captioner / "dsc").tokenizer
    rng = random.Random(0)
    scenes = [sample_scene(rng, WorldConfig()) for _ in range(8)]
    # First sentences (objects, colours, sizes, cells): short enough to learn quickly.
    captions = [descriptive_caption(sc, rng).split(". ")[0] + "." for sc in scenes]
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=128)
    )
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in captions]
    width = max(map(len, ids))
    batch = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i in ids])
    prefixes = torch.randn(len(ids), 2, 64)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(150):
        emb = torch.cat([prefixes, lm.get_input_embeddings()(batch)], dim=1)
        logits = lm(inputs_embeds=emb).logits[:, 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(tok)), batch.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    judged = scenes[:4] + scenes[4:][::-1]  # the last four images judged by other scenes
    eos, beams, n = tok.eos_token_id, 4, 2
    suppress = [i for i in tok.all_special_ids if i != eos]
    written = {}
    for checked in (False, True):
        mine = beam_search(
            lm,
            prefixes,
            num_beams=beams,
            max_new_tokens=width + 4,
            eos_token_id=eos,
            suppress_tokens=suppress,
            num_return_sequences=n,
            check=ClauseCheck(tok, judged, beams) if checked else None,
        )
        processors = LogitsProcessorList([ClauseCheck(tok, judged, beams)] if checked else [])
        theirs = lm.generate(
            inputs_embeds=prefixes,
            attention_mask=torch.ones(prefixes.shape[:2], dtype=torch.long),
            num_beams=beams,
            num_return_sequences=n,
            max_new_tokens=width + 4,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=suppress,
            do_sample=False,
            logits_processor=processors,
        )
        written[checked] = tok.batch_decode(mine, skip_special_tokens=True)
        assert written[checked] == tok.batch_decode(theirs, skip_special_tokens=True), checked
    assert written[False][0] == captions[0]  # learnt by heart
    best = {checked: captions[::n] for checked, captions in written.items()}
    assert best[False][:4] == best[True][:4]  # true captions pass the check
    assert best[False][4:] != best[True][4:]


def test_look_ahead_charges_a_false_claim_while_the_true_word_is_still_a_candidate():
    """A bigram LM prefers "A red circle ..." to "A red star ...". Two images decoded
    together, one beam each: one of a red star, one of a red circle. The check alone
    charges "circle" only at the next token, when the star image's beam holds it: its
    caption is false. Looking ahead, "circle" is charged as it is written for the star
    image, which keeps "star", the other candidate of that step; the circle image, judged
    by its own scene, keeps "circle"."""
    from types import SimpleNamespace

    from corpus.world import Scene, SceneObject
    from models.captioning.beam_search import beam_search
    from models.captioning.verified_search import ClauseCheck
    from models.common.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)  # a BPE of the world's captions: one token per word
    texts = [descriptive_caption(sample_scene(rng, WorldConfig()), rng) for _ in range(300)]
    tok = train_bpe_tokenizer(texts, 512)
    scenes = [
        Scene((SceneObject(shape, "red", "large", 0, 0),), "gray", None, None, None)
        for shape in ("star", "circle")
    ]
    star, circle = "A red star in the top left.", "A red circle in the top left."
    ids = {c: tok(c, add_special_tokens=False)["input_ids"] for c in (star, circle)}
    fork = next(i for i, (a, b) in enumerate(zip(*ids.values(), strict=False)) if a != b)
    assert ids[star][fork + 1 :] == ids[circle][fork + 1 :]  # one token apart: the shape
    table = torch.full((len(tok), len(tok)), -30.0)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for caption, logp in ((star, -0.9), (circle, -0.5)):
        path = [bos, *ids[caption], eos]
        for a, b in itertools.pairwise(path):
            table[a, b] = max(float(table[a, b]), logp if b == ids[caption][fork] else 0.0)

    class Bigram(torch.nn.Module):
        def forward(self, inputs_embeds=None, input_ids=None, **_):
            last = torch.full((len(inputs_embeds), 1), bos) if input_ids is None else input_ids
            cache = SimpleNamespace(reorder_cache=lambda rows: None)
            return SimpleNamespace(logits=table[last], past_key_values=cache)

    def captions(lookahead: bool) -> list[str]:
        out = beam_search(
            Bigram(),
            torch.zeros(len(scenes), 1, 8),
            num_beams=1,
            max_new_tokens=20,
            eos_token_id=eos,
            check=ClauseCheck(tok, scenes, 1),
            lookahead=lookahead,
        )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    assert captions(lookahead=False) == [circle, circle]
    assert captions(lookahead=True) == [star, circle]
    with pytest.raises(ValueError, match="lookahead"):
        GenerationConfig(mode="beam", num_beams=2, lookahead=True)


def test_clause_checked_beam_search_needs_beams_and_concept_heads(tiny_captioner, tiny_raw):
    import pandas as pd

    from models.captioning.captioner import CaptionerSpec

    with pytest.raises(ValueError, match="check_clauses"):
        GenerationConfig(mode="nucleus", check_clauses=True)
    index = pd.read_parquet(tiny_raw / "index.parquet").head(3)
    images = load_images(tiny_raw, list(index["key"]), list(index["shard"]), 64)
    model = PrefixCaptioner.load(tiny_captioner / "dsc")
    gen = GenerationConfig(mode="beam", num_beams=3, check_clauses=True, max_new_tokens=12)
    assert len(model.generate(images, gen)) == 3
    untagged = PrefixCaptioner.build(
        CaptionerSpec(**{**vars(model.spec), "concept_heads": None}), model.tokenizer
    )
    with pytest.raises(ValueError, match="has none"):
        untagged.generate(images, gen)


def test_a_new_decoding_setting_reevaluates_without_retraining(tiny_captioner, tiny_raw, tmp_path):
    """Decoding is not training: changing `generation` re-captions the held-out images
    with the trained weights, and every phase is reused."""
    import shutil

    out = tmp_path / "captioner"
    shutil.copytree(tiny_captioner, out)
    before = {p: (out / p / "done.json").read_text() for p in PHASES}

    def stamps():
        return {p: (out / p / "model.safetensors").stat().st_mtime_ns for p in ("ssc", "dsc")}

    weights = stamps()
    gen = {"mode": "beam", "num_beams": 2, "candidates": 2, "max_new_tokens": 12}
    report = train_captioner(tiny_captioner_config(generation=gen), tiny_raw, out)
    assert {p: (out / p / "done.json").read_text() for p in PHASES} == before
    assert stamps() == weights
    assert report["config"]["generation"]["candidates"] == 2


def test_mirrored_training_pairs_flip_the_image_and_swap_left_and_right():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).reshape(2, 3, 2, 4)
    texts = ["A red circle in the top left.", 'A blue star in the center. It says "ZOO".']
    out_images, out_texts = with_mirrors(images, texts)
    # The captioned word would be mirrored too: that image gets no mirrored copy.
    assert out_texts == [*texts, "A red circle in the top right."]
    assert torch.equal(out_images[:2], images)
    assert torch.equal(out_images[2], images[0].flip(-1))


def test_auto_precision_is_bf16_only_where_the_hardware_computes_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert training_precision("auto") == "32-true"  # bf16 would be emulated: slower
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert training_precision("auto") == "bf16-mixed"
    assert training_precision("32-true") == "32-true"  # an explicit setting is kept
