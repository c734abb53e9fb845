"""What the eval report shows of the two feedback models, on the report's own images.

- `preference_model` (HPS v2 style, `models/feedback/preference.py`) scores every image
  against the prompt it was drawn from. Per form: the mean score, and how often it ranks
  an image that passes every condition above one of the same prompt that fails (0.5 is
  chance), the judge's verdict being exact. Only images of the same prompt are compared:
  across prompts a score could separate pass from fail by knowing which prompts are easy,
  without reading any image.
- `rich_feedback_model` (RAHF style, `models/feedback/rich_train.py`) predicts per image
  two heatmaps, four scores and the prompt's words the image missed. The words are
  compared with the ones the world judge's reading says were missed
  (`models.feedback.rich_labels.missed_words`): precision, recall and F1 per form. The
  heatmaps are drawn over the report's grid images (implausibility red, misalignment
  blue), captioned with the predicted missed words.

In the upsampled form each image has its own expansion, which the models read, while
the judge holds it to the short prompt's conditions: images of one prompt are scored
against different texts, and a missed word of the short prompt may not be in the
expansion the rich model read (or may lie past its context). Read that form's columns
with this in mind.

Either model may be absent; its columns are then left out and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from corpus.prompt_suite import Prompt
from corpus.world import Scene
from models.feedback.rich_labels import missed_words
from models.feedback.rich_metrics import keyword_metrics
from models.feedback.rich_model import SCORES, predicted_keywords, prompt_words, word_tokens

if TYPE_CHECKING:
    from models.feedback.judge_scorer import JudgeScorer
    from models.feedback.rich_train import RichModule

# (key under forms.<form>.feedback, label) of the per-form measures, in the report's order;
# missed_words holds precision, recall and f1.
MEASURES = (
    ("preference", "preference (score)"),
    ("preference_same_prompt_auc", "preference: pass above fail, same prompt"),
    ("rich_overall", "rich overall"),
    ("rich_overall_same_prompt_auc", "rich overall: pass above fail, same prompt"),
    ("same_prompt_pairs", "pass/fail pairs of the same prompt"),
)


@dataclass
class FeedbackModels:
    preference: JudgeScorer | None = None
    rich: RichModule | None = None
    rich_tokenizer: object | None = None  # open_clip's tokenizer of the rich model's CLIP

    @property
    def any(self) -> bool:
        return self.preference is not None or self.rich is not None


def load_feedback_models(preference: str | None, rich: str | None) -> FeedbackModels:
    """The trained models from their asset folders; None: that model is left out."""
    models = FeedbackModels()
    if preference:
        from models.feedback.preference import load_preference_model

        models.preference = load_preference_model(Path(preference))
    if rich:
        from models.feedback.rich_train import load_rich_feedback

        models.rich, models.rich_tokenizer = load_rich_feedback(Path(rich))
    return models


def same_prompt_pairs(passed: np.ndarray, prompt_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (passing, failing) of every pair of images of the same prompt of which one
    passes and the other fails."""
    ids = np.array(prompt_ids)
    same = ids[:, None] == ids[None, :]
    pos, neg = np.nonzero(same & passed[:, None] & ~passed[None, :])
    return pos, neg


def same_prompt_auc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of the passing image > score of the failing one) over the pairs `pos`,
    `neg`, ties counted half; None without a pair."""
    if not len(pos):
        return None
    a, b = scores[pos], scores[neg]
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / len(pos))


@torch.no_grad()
def predict_rich(models: FeedbackModels, images: torch.Tensor, texts: list[str]) -> dict:
    """Heatmaps (N, 2, H, W), scores (N, 4) and predicted missed words of each image."""
    module, tok = models.rich, models.rich_tokenizer
    module.eval()
    heat, scores, words = [], [], []
    for i in range(0, len(texts), 128):
        ids, owner = zip(
            *(word_tokens(tok, t, module.cfg.context) for t in texts[i : i + 128]), strict=True
        )
        out = module({"images": images[i : i + 128], "ids": torch.stack(ids)})
        heat.append(out["heatmaps"].numpy())
        scores.append(out["scores"].numpy())
        for j, t in enumerate(texts[i : i + 128]):
            words.append(predicted_keywords(out["tags"][j], owner[j], prompt_words(t)))
    return {"heatmaps": np.concatenate(heat), "scores": np.concatenate(scores), "words": words}


def score_form(
    models: FeedbackModels,
    images: torch.Tensor,
    texts: list[str],
    prompts: list[Prompt],
    scenes: list[Scene],
    passed: list[bool],
) -> tuple[list[dict], dict, np.ndarray | None]:
    """One form's images (prompts[i] is image i's suite prompt): per-image fields for
    per_image.jsonl, the form's summary, and the predicted heatmaps (None without a rich
    model)."""
    per_image: list[dict] = [{} for _ in texts]
    pos, neg = same_prompt_pairs(np.array(passed, dtype=bool), [p.id for p in prompts])
    summary: dict = {"same_prompt_pairs": len(pos)} if models.any else {}
    if models.preference is not None:
        pref = models.preference.preference(images, texts)
        for r, s in zip(per_image, pref, strict=True):
            r["preference"] = float(s)
        summary["preference"] = float(pref.mean())
        summary["preference_same_prompt_auc"] = same_prompt_auc(pref, pos, neg)
    heatmaps = None
    if models.rich is not None:
        pred = predict_rich(models, images, texts)
        truth = [missed_words(p, s) for p, s in zip(prompts, scenes, strict=True)]
        for k, r in enumerate(per_image):
            r["rich_scores"] = dict(zip(SCORES, map(float, pred["scores"][k]), strict=True))
            r["missed_words_predicted"] = sorted(pred["words"][k])
            r["missed_words_judged"] = sorted(truth[k])
        overall = pred["scores"][:, SCORES.index("overall")]
        summary["rich_overall"] = float(overall.mean())
        summary["rich_overall_same_prompt_auc"] = same_prompt_auc(overall, pos, neg)
        # Undefined (NaN) when nothing was missed or nothing predicted: null in the JSON.
        summary["missed_words"] = {
            k: (None if np.isnan(v) else v)
            for k, v in keyword_metrics(pred["words"], truth).items()
        }
        heatmaps = pred["heatmaps"]
    return per_image, summary, heatmaps
