"""The preference model's scorer: the world judge's reading of an image and a prompt read
by a small text tower, joined by cross-attention (ImageReward's kind of model: one score
from image and text encoded together, not a cosine of two separate towers).

    score(image, prompt) = alignment(prompt tokens attending to the 9 cells of the scene
                                     the judge decodes: each cell's shape, colour, word)
                           + sum over cells of plausibility(cell reading, feature and pixel stats)

Why this and not the reference CLIP's two towers: fine-tuned on the pool's pairs, the
CLIP learnt which images are clean but not which follow their prompt (below chance where
alignment decides a pair, `docs/log/2026-12-feedback.md`). The frozen world judge already
reads shape, colour, size, word and cell, as HPS v2's pretrained ViT already sees; what
the pairs must teach is what a prompt asks of that reading, how conditions add up, and
how far a drawing is from a clean one. The text tower starts from nothing: the reference
CLIP's token states did not carry a shape word the cross-attention could use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from corpus.atomic import write_atomic, write_text_atomic
from corpus.scene_text import plural
from models.evaluation.world_judge import (
    BACKGROUND_CLASSES,
    COLOUR_CLASSES,
    SHAPE_CLASSES,
    SIZES,
    WORD_CLASSES,
    JudgeConfig,
    JudgeNet,
    to_input,
)

WEIGHTS, CONFIG = "scorer.safetensors", "scorer.json"
# What the first READING values of a cell are; a scorer saved with another is refused.
READING_KIND = "scene: shape, colour, word"
GROUPS = (len(SHAPE_CLASSES), len(COLOUR_CLASSES), len(SIZES), len(WORD_CLASSES))
READING = sum(GROUPS) + len(BACKGROUND_CLASSES)  # per cell: the decoded scene, one-hot
# What alignment reads of it: shape, colour and word, what a condition can ask for (no
# prompt's condition names a size or a background; those only told images apart).
ASKED = torch.cat([torch.arange(GROUPS[0] + GROUPS[1]), torch.arange(sum(GROUPS[:3]), sum(GROUPS))])
FIRST_LAYERS = 6  # the judge's first two conv blocks, at its full input size


def cell_statistics(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 9, 3C): per grid cell, each channel's mean, std and max."""
    b, c, h, w = maps.shape
    if h % 3 or w % 3:
        raise ValueError(f"a {h}x{w} map does not split into 3x3 whole cells")
    cells = maps.reshape(b, c, 3, h // 3, 3, w // 3).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, 9, c, -1)
    return torch.cat([cells.mean(-1), cells.std(-1), cells.amax(-1)], -1)


def scene_reading(probs: torch.Tensor) -> torch.Tensor:
    """(..., 9, READING) class probabilities -> the scene the judge decodes from them, one-hot
    per cell as `WorldJudge.predict` decides it: shape; colour and size only where there
    is an object; the word in one cell at most (the one most sure it holds a word, if
    above even odds); the background. Alignment reads this and not the probabilities:
    the labels' conditions are checked on the decoded scene, so two images the judge reads
    as one scene must get one alignment score, or the alignment head's noise decides
    pairs that only plausibility tells apart."""
    groups = probs.split([*GROUPS, len(BACKGROUND_CLASSES)], -1)
    shape, colour, size, _, background = (
        F.one_hot(g.argmax(-1), g.shape[-1]).to(probs.dtype) for g in groups
    )
    present = 1.0 - shape[..., :1]  # SHAPE_CLASSES[0] is the empty cell
    p_word = 1.0 - groups[3][..., 0]  # (..., 9): WORD_CLASSES[0] is no word
    best = F.one_hot(p_word.argmax(-1), 9).to(probs.dtype) * (p_word > 0.5).to(probs.dtype)
    word = F.one_hot(groups[3][..., 1:].argmax(-1) + 1, GROUPS[3]).to(probs.dtype)
    word = word * best[..., None]
    word[..., 0] = 1.0 - best
    return torch.cat([shape, colour * present, size * present, word, background], -1)


def named_shapes(texts: list[str]) -> torch.Tensor:
    """(len(texts), len(SHAPE_CLASSES)) bool: the shapes each text names, in the singular
    or in the plural the world's texts write."""
    rows = []
    for text in texts:
        words = set(re.findall(r"[a-z]+", text.lower()))
        rows.append([False] + [s in words or plural(s) in words for s in SHAPE_CLASSES[1:]])
    return torch.tensor(rows, dtype=torch.bool)


def add_unnamed_object(
    reading: torch.Tensor, named: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A copy of `reading` (B, 9, W) where, per row, one empty cell without a word holds an
    object of a shape its prompt does not name (`named`, (B, shapes)), in a random colour.
    Every condition a prompt can state names its shapes, so such an object changes none:
    the scene follows the prompt exactly as well. Only the decoded scene's shape and colour
    change (what alignment reads); rows with no such cell or shape stay as they are."""
    n_shape, n_colour = GROUPS[0], GROUPS[1]
    no_word = sum(GROUPS[:3])
    free = (reading[..., 0] > 0.5) & (reading[..., no_word] > 0.5)  # empty, no word
    unnamed = ~named
    unnamed[:, 0] = False
    rows = torch.nonzero(free.any(1) & unnamed.any(1))[:, 0]
    cell = (torch.rand(free.shape, generator=generator) * free).argmax(1)[rows]
    shape = (torch.rand(unnamed.shape, generator=generator) * unnamed).argmax(1)[rows]
    colour = torch.randint(n_colour, (len(rows),), generator=generator)
    out = reading.clone()
    out[rows, cell, :n_shape] = F.one_hot(shape, n_shape).to(out.dtype)
    out[rows, cell, n_shape : n_shape + n_colour] = F.one_hot(colour, n_colour).to(out.dtype)
    return out


@torch.no_grad()
def read_cells(judge: JudgeNet, resolution: int, images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 9, reading_width(judge)): per cell, the scene the judge decodes (`scene_reading`:
    the first READING values, what alignment sees) and the judge's logits, then the mean,
    spread and peak of its last and first feature maps and of its input pixels over the
    cell. Plausibility is a cell's distance from a clean drawing, which the class reading
    alone does not carry: the first blocks' edges and the pixels show a blob where the
    classes say star. The judge's forward is spelt out because it returns no maps."""
    if judge.training:  # batch statistics would make a cell's reading depend on the batch
        raise ValueError("read_cells needs the judge in eval mode (judge.eval())")
    out, device = [], next(judge.parameters()).device
    for s in range(0, len(images_uint8), 256):
        x = images_uint8[s : s + 256].to(device).float()
        if x.shape[-1] != resolution or x.shape[-2] != resolution:  # as WorldJudge.predict
            x = F.interpolate(x, size=(resolution,) * 2, mode="bicubic", antialias=True)
            x = x.clamp(0, 255)
        x = F.interpolate(x, size=(judge.size,) * 2, mode="bilinear", align_corners=False)
        x = to_input(x)
        first = judge.features[:FIRST_LAYERS](x)
        h = judge.features[FIRST_LAYERS:](first)
        cells = F.adaptive_max_pool2d(judge.cell_head(h), 3).flatten(2).transpose(1, 2)
        background = judge.background_head(h.mean((2, 3)))[:, None].expand(-1, 9, -1)
        logits = torch.cat([cells, background], -1)
        groups = logits.split([*GROUPS, len(BACKGROUND_CLASSES)], -1)
        probs = torch.cat([g.softmax(-1) for g in groups], -1)
        maps = [cell_statistics(m) for m in (h, first, x)]
        out.append(torch.cat([scene_reading(probs), logits, *maps], -1))
    return torch.cat(out)


def reading_width(judge: JudgeNet) -> int:
    """The number of values per cell that `read_cells` gives for this judge."""
    first = judge.features[FIRST_LAYERS - 3].out_channels  # the second block's conv
    return 2 * READING + 3 * (judge.cell_head.in_channels + first + 3)  # h, first, RGB


class JudgeScorer(nn.Module):
    """score(image, prompt): a frozen judge's reading of the image, a text tower, and
    cross-attention from the prompt's tokens to the judge's 9 cells."""

    def __init__(
        self,
        judge: JudgeNet,
        resolution: int,
        width: int = 64,
        context_length: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.resolution, self.width, self.context_length = resolution, width, context_length
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        vocab = len(self.tokenizer.encoder)
        self.cells = nn.Sequential(nn.LayerNorm(len(ASKED)), nn.Linear(len(ASKED), width))
        self.cell_pos = nn.Parameter(torch.randn(9, width) * 0.02)
        self.tokens = nn.Embedding(vocab, width)
        self.token_pos = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = dict(
            nhead=4, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.text = nn.TransformerEncoderLayer(width, **layer)
        self.cross = nn.TransformerDecoderLayer(width, **layer)
        self.alignment = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)
        )
        # How loud alignment is against plausibility: what the second phase of
        # `preference_model.alignment_first_steps` sets, with the rest of alignment frozen.
        self.alignment_gain = nn.Parameter(torch.ones(()))
        n = reading_width(judge)
        self.plausibility = nn.Sequential(
            nn.LayerNorm(n), nn.Linear(n, width), nn.GELU(), nn.Linear(width, 1)
        )

    def train(self, mode: bool = True) -> JudgeScorer:
        super().train(mode)
        self.judge.eval()  # frozen: its batch norms keep their statistics
        return self

    def read(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """What `score` takes as `reading`: `read_cells` with this scorer's judge."""
        return read_cells(self.judge, self.resolution, images_uint8)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, context_length) -> token states and their mask, as long as the
        batch's longest text (the padding after it is masked anyway and costs time)."""
        n = max(int((ids != 0).sum(1).max()), 1)
        ids = ids[:, :n]
        mask = ids != 0
        states = self.tokens(ids) + self.token_pos[:n]
        return self.text(states, src_key_padding_mask=~mask), mask

    def score(self, reading: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of images read by `read` against encoded texts."""
        return self.alignment_score(reading, text, mask) + self.plausibility_score(reading)

    def alignment_score(
        self, reading: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The score's first term (B,): the prompt's tokens read against the decoded scene."""
        cells = self.cells(reading[..., ASKED]) + self.cell_pos
        t = self.cross(text, cells, tgt_key_padding_mask=~mask)
        pooled = (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.alignment_gain * self.alignment(pooled)[:, 0]

    def plausibility_score(self, reading: torch.Tensor) -> torch.Tensor:
        """The score's second term (B,): per cell, summed; it does not read the prompt."""
        return self.plausibility(reading).sum((1, 2))

    def forward(self, reading: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.score(reading, *self.encode_text(ids))

    @torch.no_grad()
    def preference(self, images_uint8: torch.Tensor, texts: list[str]) -> np.ndarray:
        """Per image, its score against its text (higher: preferred)."""
        if len(images_uint8) != len(texts):
            raise ValueError(f"{len(images_uint8)} images but {len(texts)} texts")
        was, device = self.training, next(self.parameters()).device
        self.eval()
        scores = [
            self(
                self.read(images_uint8[s : s + 256]),
                self.token_ids(texts[s : s + 256]).to(device),
            )
            for s in range(0, len(texts), 256)
        ]
        self.train(was)
        return torch.cat(scores).cpu().numpy() if scores else np.zeros(0, np.float32)


def save_scorer(scorer: JudgeScorer, judge_cfg: JudgeConfig, out: Path) -> None:
    """The scorer with its judge's weights: the folder stands on its own."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in scorer.state_dict().items()}
    write_atomic(out / WEIGHTS, lambda p: save_file(state, str(p)))
    cfg = {
        "width": scorer.width,
        "context_length": scorer.context_length,
        "reading": READING_KIND,
        "judge": {"resolution": judge_cfg.resolution, "width": judge_cfg.width},
    }
    write_text_atomic(out / CONFIG, json.dumps(cfg, indent=2))


def load_scorer(path: Path) -> JudgeScorer:
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"no preference scorer in {path} (expected {WEIGHTS} and {CONFIG}); materialize "
            "the preference_model asset or run `python -m models.feedback.preference`"
        )
    cfg = json.loads((path / CONFIG).read_text())
    resolution = cfg["judge"]["resolution"]
    judge = JudgeNet(resolution, cfg["judge"]["width"])
    scorer = JudgeScorer(judge, resolution, cfg["width"], cfg["context_length"])
    state = load_file(str(path / WEIGHTS))
    saved, expected = state["plausibility.0.weight"].shape[0], reading_width(judge)
    kind = cfg.get("reading", "probabilities")  # scorers saved before `reading` was written
    if saved != expected or kind != READING_KIND:
        raise ValueError(
            f"the preference scorer in {path} reads {saved} values per cell ({kind}), this "
            f"version {expected} ({READING_KIND}): it was saved by another version of "
            "recapflow; rebuild it (materialize preference_model, or `make run`)"
        )
    state.setdefault("alignment_gain", torch.ones(()))  # scorers saved before it: gain 1
    scorer.load_state_dict(state)
    return scorer.eval()
