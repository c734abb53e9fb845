"""Linear probes: can the scene a caption describes be read back out of the text encoder?

The UNet only sees the prompt through the frozen encoder: the pooled vector (added to
the timestep embedding) and the per-token states (cross-attention). If a linear read-out
cannot recover an attribute from them, no amount of UNet training will draw it.

- pooled: the background, the number of objects, the word (or none), and the main
  subject's shape, colour, size and cell (the first object the world places);
- tokens: for every object named on its own ("a large red circle in the top left"), its
  shape, colour, size and cell from the state of its shape word ("noun"; a bidirectional
  encoder lets it see the whole phrase) and of the phrase's last token ("phrase_end";
  what a causal encoder has let see the whole phrase). A UNet position that attends
  there finds what to draw and where.

Scenes come from a seed disjoint from the corpus; the probes are multinomial logistic
regressions fitted on `train` captions and scored on the others.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from corpus.scene_text import descriptive_caption
from corpus.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    WorldConfig,
    sample_scene,
)
from models.diffusion.text_encoder import FrozenTextEncoder

POOLED_KINDS = ("background", "count", "word", "shape", "colour", "size", "cell")
TOKEN_KINDS = ("shape", "colour", "size", "cell")
CELLS = sorted(CELL_NAMES)
_CELL_OF_NAME = {name: cell for cell, name in CELL_NAMES.items()}
# One object named alone: "a large red circle in the top left" (cell names are matched
# longest first, so "center left" is not read as "center").
_PHRASE = re.compile(
    r"\ban? (small|large) (\w+) (\w+) in the ("
    + "|".join(sorted(CELL_NAMES.values(), key=len, reverse=True))
    + r")\b"
)
SEED = 4_000_049  # disjoint from the corpus and every evaluator's seed (docs/evaluation.md)
TEXT_PROBES = 4000  # captions of fresh scenes the probes fit and test on


@dataclass(frozen=True)
class ProbeData:
    captions: list[str]
    pooled_targets: dict[str, np.ndarray]  # kind -> (n_captions,)
    # per named-alone object: the caption it is in and two char offsets, the end of its
    # shape word and the end of its phrase
    token_rows: list[tuple[int, int, int]]
    token_targets: dict[str, np.ndarray]  # kind -> (n_objects,)


def probe_data(n: int, seed: int = SEED) -> ProbeData:
    rng = random.Random(seed)
    cfg = WorldConfig()
    captions: list[str] = []
    pooled: dict[str, list[int]] = {k: [] for k in POOLED_KINDS}
    rows: list[tuple[int, int, int]] = []
    tokens: dict[str, list[int]] = {k: [] for k in TOKEN_KINDS}
    for i in range(n):
        scene: Scene = sample_scene(rng, cfg)
        caption = descriptive_caption(scene, rng)
        captions.append(caption)
        main = scene.objects[0]
        pooled["background"].append(list(BACKGROUNDS).index(scene.background))
        pooled["count"].append(len(scene.objects) - 1)
        pooled["word"].append(WORDS.index(scene.word) + 1 if scene.word else 0)
        pooled["shape"].append(SHAPES.index(main.shape))
        pooled["colour"].append(list(COLORS).index(main.color))
        pooled["size"].append(SIZES.index(main.size))
        pooled["cell"].append(CELLS.index((main.row, main.col)))
        for m in _PHRASE.finditer(caption):
            size, colour, shape, cell = m.groups()
            if shape not in SHAPES:  # "a large red circle" is alone; plurals never match
                continue
            rows.append((i, m.end(3), m.end()))
            tokens["shape"].append(SHAPES.index(shape))
            tokens["colour"].append(list(COLORS).index(colour))
            tokens["size"].append(SIZES.index(size))
            tokens["cell"].append(CELLS.index(_CELL_OF_NAME[cell]))
    as_np = lambda d: {k: np.array(v) for k, v in d.items()}  # noqa: E731
    return ProbeData(captions, as_np(pooled), rows, as_np(tokens))


@torch.no_grad()
def _features(encoder: FrozenTextEncoder, data: ProbeData):
    """(pooled per caption, {where: token state per object}, whether each object's phrase
    fits in the context); where is "noun" (the shape word) or "phrase_end"."""
    pooled: list[torch.Tensor] = []
    picked: dict[str, list[torch.Tensor]] = {"noun": [], "phrase_end": []}
    seen: list[bool] = []
    by_caption: dict[int, list[tuple[int, int]]] = {}
    for i, noun, end in data.token_rows:
        by_caption.setdefault(i, []).append((noun, end))
    ctx = encoder.context_length

    def tokens_before(caption: str, end: int) -> int:
        # Our tokenizers put no BOS first: the character before `end` is in token n - 1.
        return len(encoder.tokenizer(caption[:end], add_special_tokens=False)["input_ids"])

    for start in range(0, len(data.captions), 256):
        chunk = data.captions[start : start + 256]
        states, p = encoder(chunk)
        pooled.append(p.float().cpu())
        for j, caption in enumerate(chunk):
            for noun, end in by_caption.get(start + j, []):
                n_noun, n_end = tokens_before(caption, noun), tokens_before(caption, end)
                seen.append(n_end <= ctx - 1)  # the EOS takes the last place
                # Past the context: the last token there (counted as not seen).
                picked["noun"].append(states[j, min(n_noun, ctx) - 1].float().cpu())
                picked["phrase_end"].append(states[j, min(n_end, ctx) - 1].float().cpu())
    return torch.cat(pooled), {k: torch.stack(v) for k, v in picked.items()}, np.array(seen)


def linear_probe(
    x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray
) -> float | None:
    """Held-out accuracy of a multinomial logistic regression (standardised features,
    a little L2, full-batch L-BFGS); None when either side has no example (a context so
    short that no object phrase fits)."""
    if len(y_train) < 2 or len(y_test) == 0:
        return None
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    xs, xt = (x_train - mean) / std, (x_test - mean) / std
    y = torch.from_numpy(y_train).long()
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    lin = torch.nn.Linear(xs.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), y) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    pred = lin(xt).argmax(1).numpy()
    return float((pred == y_test).mean())


def probe_text_encoder(
    encoder: FrozenTextEncoder, n: int = TEXT_PROBES, train: float = 0.75
) -> dict:
    """Held-out accuracies: {"pooled": {kind: acc}, "tokens": {"noun" | "phrase_end":
    {kind: acc}}}, with the numbers of captions, objects and objects past the context."""
    data = probe_data(n)
    pooled, picked, seen = _features(encoder, data)
    cut = int(n * train)
    out: dict = {
        "pooled": {},
        "tokens": {},
        "captions": n,
        "objects": len(data.token_rows),
        "objects_past_context": int((~seen).sum()),
    }
    for kind in POOLED_KINDS:
        y = data.pooled_targets[kind]
        out["pooled"][kind] = linear_probe(pooled[:cut], y[:cut], pooled[cut:], y[cut:])
    # Objects past the context cannot be read: probed on the rest, counted above.
    in_train = np.array([i < cut for i, _, _ in data.token_rows])
    obj_train, obj_test = in_train & seen, ~in_train & seen
    for where, states in picked.items():
        out["tokens"][where] = {
            kind: linear_probe(
                states[obj_train],
                data.token_targets[kind][obj_train],
                states[obj_test],
                data.token_targets[kind][obj_test],
            )
            for kind in TOKEN_KINDS
        }
    return out
