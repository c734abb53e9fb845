"""Trains and measures the rich-feedback model on the feedback pool and on corruptions.

Examples: every pool image (kind `generated`), labelled from the scene the world judge
reads in it; and, per pool prompt, its reference scene rendered clean and damaged by one
corruption of `models/feedback/rich_labels.py` (kind = the corruption), labelled from the
known scene. Splits follow the pool's prompts. Measured on the test split with RAHF's
metrics (`models/feedback/rich_metrics.py`), overall and per kind.

    python -m models.feedback.rich_train --params params.yaml --pool data/feedback_pool \
        --reference-clip data/reference_clip --out data/rich_feedback_model
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from corpus.atomic import write_atomic, write_text_atomic
from corpus.config import build_config
from corpus.prompt_suite import Prompt
from corpus.world import Scene
from models.common.clip import clip_preprocess_cfg, warmup_cosine_adamw
from models.common.data import normalize_images
from models.evaluation.reference_clip import load_reference_clip
from models.evaluation.world_judge import render_scenes
from models.feedback import rich_metrics as R
from models.feedback.pool import Pool, load_pool
from models.feedback.rich_labels import CORRUPTIONS, corrupt, rich_labels
from models.feedback.rich_model import (
    HEATMAPS,
    SCORES,
    RichFeedbackNet,
    predicted_keywords,
    prompt_words,
    rich_loss,
    token_tags,
    word_tokens,
)
from models.feedback.trainer import fine_tune_trainer

# RAHF's reproduction (github youweiliang/RichHF) on RichHF-18K's test set, for the table.
REPRODUCTION = {
    "plcc": {"plausibility": 0.739, "aesthetics": 0.629, "alignment": 0.565, "overall": 0.642},
    "implausibility": {"cc": 0.525, "kld": 1.649, "nss": 2.029, "auc_judd": 0.905},
    "keywords": {"f1": 0.48},
}


@dataclass(frozen=True)
class RichConfig:
    width: int = 96
    layers: int = 2
    heads: int = 4
    dropout: float = 0.0  # in the joint layers (see preference_model.dropout)
    context: int = 48  # text tokens: the suite's descriptive prompts fit
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    # The two uses (models/feedback/uses.py), with the pool's first model at its own
    # sampling settings; 0 images or candidates: not measured.
    repair_images: int = 112
    repair_threshold: float = 0.5
    selection_candidates: int = 448
    selection_k: int = 112
    selection_steps: int = 200
    selection_lr: float = 1e-4
    seed: int = 6_000_059

    @classmethod
    def from_dict(cls, d: dict) -> RichConfig:
        return build_config(cls, d, "rich_feedback_model")


def build_examples(pool: Pool, seed: int) -> dict:
    """Images, targets, words and kinds of every example (pool images, then corruptions)."""
    prompts = [Prompt.from_dict(r["prompt"]) for r in pool.prompts]
    rng = random.Random(seed)
    images, scenes, clean, kinds, prompt_of = [], [], [], [], []
    judged = [Scene.from_dict(x["scene"]) for x in pool.labels]
    renders = render_scenes(judged, pool.images.shape[-1])
    for i, x in enumerate(pool.labels):
        images.append(pool.images[i])
        scenes.append(judged[i])
        clean.append(renders[i])
        kinds.append("generated")
        prompt_of.append(x["prompt"])
    refs = render_scenes([p.scene for p in prompts], pool.images.shape[-1])
    for q, p in enumerate(prompts):
        usable = [k for k in CORRUPTIONS if (k == "distorted_word") == bool(p.scene.word)]
        usable = [k for k in usable if k == "distorted_word" or p.scene.objects]
        kind = rng.choice(usable)
        images.append(corrupt(refs[q], p.scene, kind, seed=seed + q))
        scenes.append(p.scene)
        clean.append(refs[q])
        kinds.append(kind)
        prompt_of.append(q)
    texts = [pool.prompts[q]["text"] for q in prompt_of]
    labels = [
        rich_labels(prompts[q], s, im, c, pool.config.utility)
        for q, s, im, c in zip(prompt_of, scenes, images, clean, strict=True)
    ]
    return {
        "images": torch.stack(images),
        "heatmaps": torch.from_numpy(
            np.stack([np.stack([lab[h] for h in HEATMAPS]) for lab in labels])
        ),
        "scores": torch.tensor([[lab["scores"][s] for s in SCORES] for lab in labels]),
        "keywords": [set(lab["keywords"]) for lab in labels],
        "texts": texts,
        "kinds": kinds,
        "split": [pool.split_of(q) for q in prompt_of],
    }


class _Data(torch.utils.data.Dataset):
    def __init__(self, ex: dict, index: list[int], tokenizer, context: int):
        self.ex, self.index = ex, index
        self.tokens = [word_tokens(tokenizer, ex["texts"][i], context) for i in index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, (ids, owner) = self.index[k], self.tokens[k]
        words = prompt_words(self.ex["texts"][i])
        return {
            "images": self.ex["images"][i],
            "ids": ids,
            "owner": owner,
            "heatmaps": self.ex["heatmaps"][i],
            "scores": self.ex["scores"][i],
            "tags": token_tags(owner, words, self.ex["keywords"][i]),
        }


class RichModule(L.LightningModule):
    def __init__(self, net: RichFeedbackNet, cfg: RichConfig):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.size, self.mean, self.std = clip_preprocess_cfg(net.clip)

    def forward(self, batch: dict) -> dict:
        """Maps at the images' own size, whatever the CLIP's input size."""
        x = normalize_images(batch["images"], self.size, self.mean, self.std)
        out = self.net(x, batch["ids"])
        size = batch["images"].shape[-2:]
        if out["heatmaps"].shape[-2:] != size:
            out["heatmaps"] = torch.nn.functional.interpolate(
                out["heatmaps"], size=size, mode="bilinear"
            )
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = rich_loss(self(batch), batch)
        self.log_dict({f"rich/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["total"]

    def configure_optimizers(self):
        c = self.cfg
        return warmup_cosine_adamw(self, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


@torch.no_grad()
def predict(module: RichModule, data: _Data) -> dict:
    module.eval()
    heat, scores, keywords = [], [], []
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    k = 0
    for batch in loader:
        out = module(batch)
        heat.append(out["heatmaps"].numpy())
        scores.append(out["scores"].numpy())
        for j in range(len(batch["ids"])):
            words = prompt_words(data.ex["texts"][data.index[k]])
            keywords.append(predicted_keywords(out["tags"][j], batch["owner"][j], words))
            k += 1
    return {
        "heatmaps": np.concatenate(heat),
        "scores": np.concatenate(scores),
        "keywords": keywords,
    }


def measure(pred: dict, ex: dict, index: list[int]) -> dict:
    """RAHF's table on the examples `index` (pred rows in the same order)."""
    truth_scores = ex["scores"][index].numpy()
    out = {
        "examples": len(index),
        "scores": {
            s: {
                "plcc": _safe(R.plcc, pred["scores"][:, j], truth_scores[:, j]),
                "srcc": _safe(R.srcc, pred["scores"][:, j], truth_scores[:, j]),
            }
            for j, s in enumerate(SCORES)
        },
    }
    for h, name in enumerate(HEATMAPS):
        out[name] = R.heatmap_metrics(
            list(pred["heatmaps"][:, h]), list(ex["heatmaps"][index, h].numpy())
        )
        out[name]["mse"] = float(
            np.mean((pred["heatmaps"][:, h] - ex["heatmaps"][index, h].numpy()) ** 2)
        )
    out["keywords"] = R.keyword_metrics(pred["keywords"], [ex["keywords"][i] for i in index])
    return out


def overlay(
    image_uint8: torch.Tensor, heatmaps: np.ndarray, full_at: float | None = None
) -> Image.Image:
    """A PIL image of `image_uint8` (3, H, W) with implausibility (heatmaps[0]) tinted red
    and misalignment (heatmaps[1]) blue over it: blended at 40% over the dimmed image, or,
    with `full_at`, over the image as it is, each tint's opacity growing with its map up
    to 0.7 at `full_at` and above (low values stay nearly clear)."""

    img = image_uint8.permute(1, 2, 0).float().numpy()
    if full_at is None:
        tint = np.stack([heatmaps[0], np.zeros_like(heatmaps[0]), heatmaps[1]], -1) * 255
        return Image.fromarray((0.6 * img + 0.4 * tint).clip(0, 255).astype(np.uint8))
    for heat, colour in zip(heatmaps, ([255.0, 0, 0], [0, 64.0, 255]), strict=True):
        alpha = 0.7 * np.clip(heat / full_at, 0, 1)[..., None]
        img = (1 - alpha) * img + alpha * np.array(colour)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def overlay_grid(pred: dict, ex: dict, index: list[int], n: int = 12):
    """Test examples with the predicted implausibility in red and misalignment in blue
    over them, captioned with the predicted missed words (and the true ones)."""
    from corpus.preview import caption_grid

    tiles, captions = [], []
    for k in range(min(n, len(index))):
        i = index[k]
        tiles.append(overlay(ex["images"][i], pred["heatmaps"][k]))
        said = ", ".join(sorted(pred["keywords"][k])) or "-"
        true = ", ".join(sorted(ex["keywords"][i])) or "-"
        captions.append(f"{ex['kinds'][i]}: {ex['texts'][i]} | missed: {said} (true: {true})")
    return caption_grid(tiles, captions, cols=4, tile=128, lines=4)


def _safe(fn, a: np.ndarray, b: np.ndarray) -> float:
    """A correlation, or nan where either side is constant or single (nothing to rank)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return fn(a, b)


def measure_uses(
    module: RichModule, tok, pool: Pool, judge_dir: Path, cfg: RichConfig, root: Path
) -> dict:
    """Region repair on the pool's test prompts and data selection from its train
    prompts, with the pool's first model (EMA weights)."""
    from models.diffusion.text_to_image import load_text_to_image
    from models.evaluation.world_judge import load_judge
    from models.feedback.uses import repair_study, selection_study

    pipe = load_text_to_image(root / pool.config.models[0].path)
    judge = load_judge(judge_dir)
    rows = [(Prompt.from_dict(r["prompt"]), r["text"], r["split"]) for r in pool.prompts]
    test = [(p, t) for p, t, s in rows if s == "test"]
    train = [(p, t) for p, t, s in rows if s == "train"]
    out = {}
    if cfg.repair_images:
        chosen = [test[i % len(test)] for i in range(cfg.repair_images)]
        texts = [t for _, t in chosen]
        images = pipe(texts, seed=cfg.seed)
        out["repair"] = repair_study(
            pipe,
            module,
            tok,
            judge,
            images,
            [p for p, _ in chosen],
            texts,
            threshold=cfg.repair_threshold,
            seed=cfg.seed,
        )
    if cfg.selection_candidates:
        chosen = [train[i % len(train)] for i in range(cfg.selection_candidates)]
        out["selection"] = selection_study(
            pipe,
            module,
            tok,
            judge,
            chosen,
            test,
            k=cfg.selection_k,
            steps=cfg.selection_steps,
            lr=cfg.selection_lr,
            seed=cfg.seed,
        )
    return out


def train_rich_feedback(
    cfg: RichConfig,
    pool_dir: Path,
    reference_clip: Path,
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
    judge_dir: Path = Path("data/world_judge"),
    root: Path = Path("."),
) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    pool = load_pool(pool_dir)
    ex = build_examples(pool, cfg.seed)
    clip = load_reference_clip(reference_clip)
    net = RichFeedbackNet(clip.model.train(), cfg.width, cfg.layers, cfg.heads, cfg.dropout)
    tok = open_clip.get_tokenizer(clip.model_name)
    train = [i for i, s in enumerate(ex["split"]) if s == "train"]
    test = [i for i, s in enumerate(ex["split"]) if s == "test"]
    module = RichModule(net, cfg)
    loader = torch.utils.data.DataLoader(
        _Data(ex, train, tok, cfg.context), batch_size=cfg.batch_size, shuffle=True, drop_last=True
    )
    fine_tune_trainer(cfg.max_steps, logger).fit(module, loader)
    pred = predict(module, _Data(ex, test, tok, cfg.context))
    metrics = {"test": measure(pred, ex, test), "by_kind": {}}
    for kind in sorted({ex["kinds"][i] for i in test}):
        rows = [k for k, i in enumerate(test) if ex["kinds"][i] == kind]
        sub = {
            key: (v[rows] if isinstance(v, np.ndarray) else [v[r] for r in rows])
            for key, v in pred.items()
        }
        metrics["by_kind"][kind] = measure(sub, ex, [test[r] for r in rows])
    if cfg.repair_images or cfg.selection_candidates:
        metrics["uses"] = measure_uses(module, tok, pool, judge_dir, cfg, root)
    metrics.update(
        {
            "examples": {k: ex["kinds"].count(k) for k in sorted(set(ex["kinds"]))},
            "reproduction": REPRODUCTION,
            "seconds": round(time.time() - t0, 1),
            "config": asdict(cfg),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    write_text_atomic(
        out / "config.json", json.dumps({"model_name": clip.model_name, **asdict(cfg)})
    )
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    grid = overlay_grid(pred, ex, test)
    write_atomic(out / "overlays.png", lambda tmp: grid.save(tmp, format="PNG"))
    return metrics


def load_rich_feedback(path: Path) -> tuple[RichModule, object]:
    """The trained model and its tokenizer."""
    from models.common.clip import create_clip

    cfg_d = json.loads((Path(path) / "config.json").read_text())
    name = cfg_d.pop("model_name")
    cfg = RichConfig.from_dict(cfg_d)
    net = RichFeedbackNet(create_clip(name), cfg.width, cfg.layers, cfg.heads)
    net.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return RichModule(net.eval(), cfg), open_clip.get_tokenizer(name)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--reference-clip", type=Path, required=True)
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, RichConfig)
    args = ap.parse_args()
    cfg = config_from_args(RichConfig, args, "rich_feedback_model")
    metrics = train_rich_feedback(cfg, args.pool, args.reference_clip, args.out, None, args.judge)
    print(
        json.dumps(
            {k: v for k, v in metrics.items() if k not in ("config", "reproduction")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
