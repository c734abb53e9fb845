"""A concept detector trained from captions: the image tower learns which words a caption
uses, through a linear multi-label head over the vocabulary on its pooled embedding, and
what each cell of the world's 3x3 grid holds, through linear shape, colour, size and
rendered-word heads on its patch tokens pooled to that grid.

Why (docs/log/): the tiny tower learns object shapes quickly when a linear head is told
them, even from the small human-captioned subset alone, but not through any objective
that also has to learn its text side from scratch (contrastive CLIP, captioning, also on
clean captions). Word detectors trained from captions are an
old captioning recipe (Fang et al. 2015, "From captions to visual concepts and back";
Wu et al. 2016). The words come from the human-written short captions, so no label the
corpus does not have is used; the word head is dropped after training and the tower is kept.
The cell targets are parsed from the human-written descriptive captions, which place every
object they name ("a small red star in the top left"), with the caption-quality parser
(corpus/caption_metrics.py): grounded phrases, the way phrase-grounding work uses
captions. A cell the caption places nothing in is "nothing"; an unstated colour or size
is ignored. The word head reads the sentence that quotes a rendered word and names its
cell ('The word "CAT" is written in the top left'): without it the captioner learns that
a word is there but not which, and quotes wrong words (docs/log/).

The cell heads are kept: frozen beside the frozen tower they were trained on, they read the
held-out scenes almost exactly, so the captioner uses them to verify its candidate captions
(`predicted_scenes`, `most_consistent`; GenerationConfig.candidates).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from corpus.caption_metrics import KINDS, extract_claims, score_caption, word_cells
from corpus.world import CELL_NAMES, COLORS, SHAPES, SIZES, WORDS, Scene, SceneObject
from models.common.clip import (
    cell_tokens,
    clip_preprocess_cfg,
    create_clip,
    visual_features,
    warmup_cosine_adamw,
)
from models.common.data import normalize_images

GRID = 3  # the world's grid (corpus/world.py); cell k is (row, col) = divmod(k, GRID)
_CELL_INDEX = {name: r * GRID + c for (r, c), name in CELL_NAMES.items()}
_COLOUR_NAMES = tuple(COLORS)
IGNORE = -100  # no target: the colour or size a caption leaves unstated
# The per-cell heads' classes, as a caption writes them: "" is class 0, nothing there.
CELL_CLASSES: dict[str, list[str]] = {
    "shapes": ["", *SHAPES],
    "colours": ["", *COLORS],
    "sizes": list(SIZES),
    "words": ["", *WORDS],
}
CELL_HEADS_FILE = "cell_heads.safetensors"


def word_targets(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """(N, vocab) multi-hot of the tokens each text contains, special tokens excluded."""
    out = torch.zeros(len(texts), len(tokenizer))
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        out[i, ids] = 1.0
    out[:, tokenizer.all_special_ids] = 0.0
    return out


def cell_targets(texts: list[str]) -> dict[str, torch.Tensor]:
    """(N, 9) classes per grid cell from the objects each caption places: `cell_shapes` and
    `cell_colours` 0 for nothing placed there, k for SHAPES[k - 1] / the k-th colour;
    `cell_sizes` the index in SIZES where a size is stated, IGNORE elsewhere; `cell_words`
    k for WORDS[k - 1] in the cell a sentence quoting that word names, 0 elsewhere."""
    shapes = torch.zeros(len(texts), GRID * GRID, dtype=torch.long)
    colours = torch.zeros_like(shapes)
    sizes = torch.full_like(shapes, IGNORE)
    words = torch.zeros_like(shapes)
    for i, text in enumerate(texts):
        for size, colour, shape, cell in extract_claims(text or "").placed:
            k = _CELL_INDEX[cell]
            shapes[i, k] = SHAPES.index(shape) + 1
            colours[i, k] = _COLOUR_NAMES.index(colour) + 1 if colour else IGNORE
            sizes[i, k] = SIZES.index(size) if size else IGNORE
        for word, cell in word_cells(text or ""):
            words[i, _CELL_INDEX[cell]] = WORDS.index(word) + 1
    return {
        "cell_shapes": shapes,
        "cell_colours": colours,
        "cell_sizes": sizes,
        "cell_words": words,
    }


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the targets that are not IGNORE; 0 (not NaN) when a batch has none."""
    keep = target != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


class ConceptModule(L.LightningModule):
    """Trains the image tower of an open_clip model (text tower frozen) with a word head
    on its pooled embedding and shape/colour/size heads on its cell tokens."""

    def __init__(
        self,
        model_name: str,
        clip_weights: str,
        vocab_size: int,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        max_steps: int = 800,
        cell_weight: float = 1.0,
    ):
        super().__init__()
        # Not save_hyperparameters(): the `clip` phase already logged lr/max_steps to the
        # same MLflow run, and MLflow refuses a param's second value (the run config has them).
        self.opt = (lr, weight_decay, warmup_steps, max_steps)
        self.cell_weight = cell_weight
        self.model = create_clip(model_name)
        self.model.load_state_dict(load_file(clip_weights))
        self.model.requires_grad_(False)
        self.model.visual.requires_grad_(True)
        if hasattr(self.model.visual, "output_tokens"):  # ViTs: the patch tokens too
            self.model.visual.output_tokens = True
        self.image_size, self.mean, self.std = clip_preprocess_cfg(self.model)
        dim = self.model.visual.output_dim
        self.head = torch.nn.Linear(dim, vocab_size)
        # A caption uses a handful of the vocabulary's words: start every word unlikely.
        torch.nn.init.constant_(self.head.bias, -4.0)
        with torch.no_grad():
            _, grid = visual_features(self.model.visual, torch.zeros(1, 3, *[self.image_size] * 2))
        self.cell_heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(grid.shape[1], len(n)) for name, n in CELL_CLASSES.items()}
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = normalize_images(batch["images"], self.image_size, self.mean, self.std)
        pooled, grid = visual_features(self.model.visual, x)
        logits = self.head(pooled)
        word_loss = (
            F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none")
            .sum(1)
            .mean()
        )
        logs = {"concepts/word_loss": word_loss}
        loss = word_loss
        if "cell_shapes" in batch and self.cell_weight > 0:
            cells = cell_tokens(grid, GRID)  # (B, 9, C)
            logits_of = {name: head(cells) for name, head in self.cell_heads.items()}
            # Summed over the cells like the word loss over words, averaged over images.
            cell_loss = (
                GRID
                * GRID
                * sum(
                    _cross_entropy(out.flatten(0, 1), batch[f"cell_{name}"].flatten())
                    for name, out in logits_of.items()
                    if f"cell_{name}" in batch
                )
            )
            loss = loss + self.cell_weight * cell_loss
            with torch.no_grad():  # of the cells that hold a placed object
                placed = batch["cell_shapes"] > 0
                hit = logits_of["shapes"].argmax(-1) == batch["cell_shapes"]
                logs |= {
                    "concepts/cell_loss": cell_loss,
                    "concepts/cell_shape_acc": hit[placed].float().mean(),
                }
                if "cell_words" in batch and (batch["cell_words"] > 0).any():
                    written = batch["cell_words"] > 0
                    read = logits_of["words"].argmax(-1) == batch["cell_words"]
                    logs["concepts/cell_word_acc"] = read[written].float().mean()
        with torch.no_grad():  # share of caption words ranked in the image's top-k words
            k = int(batch["targets"].sum(1).max().item())
            top = logits.topk(max(k, 1), dim=1).indices
            hit = batch["targets"].gather(1, top).sum() / batch["targets"].sum().clamp(min=1)
        logs |= {"concepts/loss": loss, "concepts/recall_at_k": hit}
        self.log_dict(logs, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return warmup_cosine_adamw(self, *self.opt)


def save_cell_heads(module: ConceptModule, out_dir: Path) -> None:
    """The trained per-cell heads, which the captioner keeps as its verifier."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.cell_heads.state_dict().items()}
    save_file(state, str(Path(out_dir) / CELL_HEADS_FILE))


def predicted_scenes(logits: dict[str, torch.Tensor]) -> list[Scene]:
    """The scenes the per-cell heads see: {head: (B, 9, classes) logits} -> one Scene per
    image, its objects where the shape head sees one (the likeliest colour that is not
    "nothing"), its word where the word head reads one. No background head: "" there."""
    best = {k: v.argmax(-1).tolist() for k, v in logits.items()}
    colour = logits["colours"][..., 1:].argmax(-1).add(1).tolist()
    scenes = []
    for i, shapes in enumerate(best["shapes"]):
        objects, word = [], (None, None, None)
        for k, s in enumerate(shapes):
            row, col = divmod(k, GRID)
            if s:
                objects.append(
                    SceneObject(
                        SHAPES[s - 1],
                        _COLOUR_NAMES[colour[i][k] - 1],
                        SIZES[best["sizes"][i][k]],
                        row,
                        col,
                    )
                )
            if best["words"][i][k] and word[0] is None:
                word = (WORDS[best["words"][i][k] - 1], row, col)
        scenes.append(Scene(tuple(objects), "", *word))
    return scenes


def contradictions(caption: str, scene: Scene) -> int:
    """How many of the caption's claims the scene contradicts, background aside (no head
    predicts it)."""
    score = score_caption(caption, scene)
    return sum(score[k]["n_claims"] - score[k]["n_true"] for k in KINDS if k != "background")


def most_consistent(candidates: list[list[str]], scenes: list[Scene]) -> list[str]:
    """Per image, the first candidate (candidates come best first) with the fewest
    claims its predicted scene contradicts."""
    return [
        min(cands, key=lambda c: contradictions(c, scene))
        for cands, scene in zip(candidates, scenes, strict=True)
    ]
