"""The two uses of rich feedback, on a tiny random model with a judge we control."""

import open_clip
import torch

from corpus.prompt_suite import build_suite
from corpus.world import Scene
from models.common.clip import create_clip
from models.diffusion.text_to_image import load_text_to_image
from models.feedback.rich_model import RichFeedbackNet
from models.feedback.rich_train import RichConfig, RichModule
from models.feedback.uses import _changes, random_like, repair_study, selection_study
from tests.models.diffusion.test_diffusers_export import _recapflow_export

NAME = "recapflow-tiny-reference-clip"


def test_changes_count_conditions_that_turned_either_way():
    before = [[False, True], [False, False]]
    after = [[True, True], [False, True]]
    c = _changes(before, [[True, False], [False, True]])
    assert (c["fixed"], c["broken"], c["failed_before"]) == (2, 1, 3)
    assert _changes(before, after)["all_conditions_after"] == 0.5


def test_a_random_mask_flags_as_many_positions_elsewhere():
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, 0, :2] = 1
    mask[2, 0, 5, 5] = 1
    r = random_like(mask, seed=0)
    assert r.view(3, -1).sum(1).tolist() == [16, 0, 1]


class EmptyJudge:  # reads an empty scene in every image: every condition fails
    def predict(self, images):
        return [Scene((), "white")] * len(images)


def test_both_studies_run_end_to_end_and_count_consistently(tmp_path):
    _recapflow_export(tmp_path / "model", "recapflow-tiny-vae")
    pipe = load_text_to_image(tmp_path / "model")
    pipe.eval_cfg["steps"] = 2
    prompts = build_suite(1)[:4]
    texts = [p.short for p in prompts]
    module = RichModule(RichFeedbackNet(create_clip(NAME)), RichConfig(context=24))
    tok = open_clip.get_tokenizer(NAME)
    images = pipe(texts, seed=0, steps=2)
    out = repair_study(pipe, module, tok, EmptyJudge(), images, prompts, texts, threshold=0.5)
    for name in ("predicted", "random"):
        assert out[name]["fixed"] == 0 and out[name]["broken"] == 0  # the judge never changes
        assert out[name]["failed_before"] == sum(len(p.conditions) for p in prompts)
    sel = selection_study(
        pipe,
        module,
        tok,
        EmptyJudge(),
        list(zip(prompts, texts, strict=True)),
        list(zip(prompts[:2], texts[:2], strict=True)),
        k=2,
        steps=1,
        lr=1e-4,
    )
    assert sel["before"] == 0.0 and sel["predicted_top"]["after"] == 0.0
    assert set(sel) >= {"predicted_top", "random", "k", "steps"}
