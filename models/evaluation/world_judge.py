"""The world judge: reads a generated image back into a scene, GenEval-style.

The synthetic world places objects on a 3x3 grid, so the judge is a small CNN whose
output is a 3x3 map: per cell, the shape (or empty), colour, size and rendered word (or
none), and the background for the image. It is trained once on ground-truth renders
drawn from a seed disjoint from the corpus and the prompt suite, read at the resolution
the diffusion model generates (through `models.common.data.fit_square`, as the corpus is read),
and proves itself on held-out renders before it judges anything.

    python -m models.evaluation.world_judge --params params.yaml --out data/world_judge
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from corpus.atomic import write_atomic, write_text_atomic
from corpus.config import build_config
from corpus.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    SceneObject,
    WorldConfig,
    render,
    sample_scene,
)
from models.common.data import fit_square

EMPTY, NO_WORD = "empty", "none"
SHAPE_CLASSES = (EMPTY, *SHAPES)
COLOUR_CLASSES = tuple(COLORS)
WORD_CLASSES = (NO_WORD, *WORDS)
BACKGROUND_CLASSES = tuple(BACKGROUNDS)
CELLS = sorted(CELL_NAMES)  # (row, col), row-major: index = row * 3 + col
ATTRIBUTE_KINDS = ("shape", "colour", "size", "position", "count", "word", "background")
WEIGHTS, CONFIG = "judge.safetensors", "judge.json"


class MissingJudgeError(FileNotFoundError):
    """The world judge folder lacks its weights or config."""


@dataclass(frozen=True)
class JudgeConfig:
    resolution: int = 32  # the diffusion model's image size (the autoencoder's resolution)
    width: int = 32
    train_images: int = 20_000
    eval_images: int = 2_000
    max_steps: int = 1_500
    batch_size: int = 128
    lr: float = 3e-3
    # Renders are clean; generated images are not. Gaussian pixel noise up to this std
    # (images in [-1, 1]) keeps the judge from keying on perfectly flat colour.
    noise_std: float = 0.08
    # Renders put every object exactly at its cell's centre with hard edges; generated
    # objects sit a pixel or two off and have soft edges. Each training image is moved by
    # up to max_shift pixels or blurred by a sigma up to max_blur (`augment`).
    max_shift: int = 2
    max_blur: float = 1.0
    word_prob: float = 0.5  # words are rarer in the corpus; the judge must read them
    # Disjoint from the corpus seeds (params.yaml raw_alt_text_dataset.seed, small ints)
    # and from the prompt suite's.
    seed: int = 2_000_003
    min_accuracy: float = 0.98  # the asset check, per attribute kind

    @classmethod
    def from_dict(cls, d: dict) -> JudgeConfig:
        return build_config(cls, d, "world_judge")


class JudgeNet(nn.Module):
    """Convolutions to a map whose 3x3 pooled cells line up with the world's grid."""

    def __init__(self, resolution: int, width: int):
        super().__init__()
        # Upsample so each grid cell is a whole number of pixels (12 at 36 px).
        self.size = 36 if resolution <= 36 else 3 * round(resolution / 3 / 4) * 4
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
        )
        c = 4 * w
        self.cell_head = nn.Conv2d(
            c, len(SHAPE_CLASSES) + len(COLOUR_CLASSES) + len(SIZES) + len(WORD_CLASSES), 1
        )
        self.background_head = nn.Linear(c, len(BACKGROUND_CLASSES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """float images in [-1, 1], (B, 3, H, W) -> logits; cell maps are (B, 9, classes)."""
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = self.features(x)
        cells = F.adaptive_max_pool2d(self.cell_head(h), 3).flatten(2).transpose(1, 2)
        n_s, n_c, n_z = len(SHAPE_CLASSES), len(COLOUR_CLASSES), len(SIZES)
        return {
            "shape": cells[..., :n_s],
            "colour": cells[..., n_s : n_s + n_c],
            "size": cells[..., n_s + n_c : n_s + n_c + n_z],
            "word": cells[..., n_s + n_c + n_z :],
            "background": self.background_head(h.mean((2, 3))),
        }


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Per-cell class indices (-100 where a loss ignores the cell) and the background."""
    shape = np.zeros(9, np.int64)
    colour = np.full(9, -100, np.int64)
    size = np.full(9, -100, np.int64)
    word = np.zeros(9, np.int64)
    for o in scene.objects:
        i = o.row * 3 + o.col
        shape[i] = SHAPE_CLASSES.index(o.shape)
        colour[i] = COLOUR_CLASSES.index(o.color)
        size[i] = SIZES.index(o.size)
    if scene.word:
        word[scene.word_row * 3 + scene.word_col] = WORD_CLASSES.index(scene.word)
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "word": word,
        "background": np.array(BACKGROUND_CLASSES.index(scene.background)),
    }


def render_scenes(scenes: list[Scene], resolution: int, progress: bool = False) -> torch.Tensor:
    """uint8 (N, 3, r, r) ground-truth renders, read the way the corpus is read."""
    arr = np.stack(
        [
            fit_square(render(s), resolution)
            for s in tqdm(scenes, desc="render", disable=not progress, leave=False)
        ]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def sample_scenes(n: int, seed: int, word_prob: float) -> list[Scene]:
    rng = random.Random(seed)
    cfg = WorldConfig(word_prob=word_prob)
    return [sample_scene(rng, cfg) for _ in range(n)]


def _stack_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    per = [scene_targets(s) for s in scenes]
    return {k: torch.from_numpy(np.stack([p[k] for p in per])) for k in per[0]}


def _loss(logits: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["background"], t["background"])
    for k in ("shape", "colour", "size", "word"):
        loss = loss + F.cross_entropy(logits[k].flatten(0, 1), t[k].flatten(), ignore_index=-100)
    return loss


class WorldJudge:
    """A trained JudgeNet with its config: uint8 images in, scenes out."""

    def __init__(self, net: JudgeNet, cfg: JudgeConfig):
        self.net, self.cfg = net.eval(), cfg

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, batch_size: int = 256) -> list[Scene]:
        """Scenes read from uint8 (N, 3, H, W) images (any size; resized like the corpus
        when it is not the judge's resolution)."""
        out: list[Scene] = []
        r = self.cfg.resolution
        for start in range(0, len(images_uint8), batch_size):
            x = images_uint8[start : start + batch_size]
            if x.shape[-1] != r or x.shape[-2] != r:
                x = torch.nn.functional.interpolate(
                    x.float(), size=(r, r), mode="bicubic", antialias=True
                ).clamp(0, 255)
            logits = self.net(to_input(x))
            out += _decode_scenes(logits)
        return out


def _decode_scenes(logits: dict[str, torch.Tensor]) -> list[Scene]:
    shape = logits["shape"].argmax(-1)
    colour = logits["colour"].argmax(-1)
    size = logits["size"].argmax(-1)
    word_p = logits["word"].softmax(-1)
    background = logits["background"].argmax(-1)
    scenes = []
    for b in range(shape.shape[0]):
        objects = tuple(
            SceneObject(
                SHAPE_CLASSES[shape[b, i]],
                COLOUR_CLASSES[colour[b, i]],
                SIZES[size[b, i]],
                *CELLS[i],
            )
            for i in range(9)
            if shape[b, i] != 0
        )
        # One word at most: the cell most confident that it holds one.
        p_word = 1 - word_p[b, :, 0]
        cell = int(p_word.argmax())
        word = None
        if p_word[cell] > 0.5:
            word = WORD_CLASSES[int(word_p[b, cell, 1:].argmax()) + 1]
        wr, wc = CELLS[cell] if word else (None, None)
        scenes.append(Scene(objects, BACKGROUND_CLASSES[background[b]], word, wr, wc))
    return scenes


def _cell_map(scene: Scene) -> dict[tuple[int, int], SceneObject]:
    return {(o.row, o.col): o for o in scene.objects}


def judge_accuracy(truth: list[Scene], judged: list[Scene]) -> dict[str, float]:
    """Accuracy per attribute kind: shape, colour and size per true object (read at its
    cell); position (the set of occupied cells), count (the number of objects of each
    shape), word (the word and its cell, or no word) and background per image."""
    hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTE_KINDS}
    for t, j in zip(truth, judged, strict=True):
        jm = _cell_map(j)
        for o in t.objects:
            p = jm.get((o.row, o.col))
            hits["shape"].append(p is not None and p.shape == o.shape)
            hits["colour"].append(p is not None and p.color == o.color)
            hits["size"].append(p is not None and p.size == o.size)
        hits["position"].append(set(_cell_map(t)) == set(jm))
        hits["count"].append(_shape_counts(t) == _shape_counts(j))
        hits["word"].append((t.word, t.word_row, t.word_col) == (j.word, j.word_row, j.word_col))
        hits["background"].append(t.background == j.background)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def blur(images_uint8: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `sigma` pixels (what a decoder's soft edges look like)."""
    k = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(images_uint8.float(), [k, k], [sigma, sigma]).round().to(torch.uint8)


def shift(images_uint8: torch.Tensor, max_px: int, seed: int) -> torch.Tensor:
    """Each image moved by its own offset of up to `max_px` pixels in x and y, the edge
    pixels (the background) filling in behind."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(-max_px, max_px + 1, (len(images_uint8), 2), generator=g).tolist()
    m = max_px
    padded = F.pad(images_uint8.float(), (m, m, m, m), mode="replicate")
    h, w = images_uint8.shape[-2:]
    crops = [
        p[:, m - dy : m - dy + h, m - dx : m - dx + w]
        for p, (dy, dx) in zip(padded, d, strict=True)
    ]
    return torch.stack(crops).to(torch.uint8)


def augment(images_uint8: torch.Tensor, cfg: JudgeConfig, g: torch.Generator) -> torch.Tensor:
    """The first half of a batch shifted, the middle half blurred (one sigma per batch),
    so a quarter is both and the last quarter clean."""
    n = len(images_uint8)
    x = images_uint8.clone()
    if cfg.max_shift:
        x[: n // 2] = shift(
            x[: n // 2], cfg.max_shift, int(torch.randint(2**31, (1,), generator=g))
        )
    if cfg.max_blur:
        sigma = 0.3 + float(torch.rand(1, generator=g)) * (cfg.max_blur - 0.3)
        x[n // 4 : 3 * n // 4] = blur(x[n // 4 : 3 * n // 4], sigma)
    return x


# The judge reads generated images, which are never clean renders: it is measured on
# renders degraded the ways a decoder degrades them, besides the clean ones.
PERTURBATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "blur_0.5px": lambda x: blur(x, 0.5),
    "blur_1px": lambda x: blur(x, 1.0),
    "shift_2px": lambda x: shift(x, 2, seed=0),
}


def robustness(judge: WorldJudge, scenes: list[Scene], images_uint8: torch.Tensor) -> dict:
    """Accuracy per attribute kind on each perturbation of the same renders."""
    return {
        name: judge_accuracy(scenes, judge.predict(perturb(images_uint8)))
        for name, perturb in PERTURBATIONS.items()
    }


def failing_kinds(metrics: dict) -> dict[str, float]:
    """Attribute kinds a trained judge (its metrics.json) reads below its own bar."""
    return {k: v for k, v in metrics["accuracy"].items() if v < metrics["min_accuracy"]}


def _shape_counts(scene: Scene) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in scene.objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    return counts


def train_judge(
    cfg: JudgeConfig,
    out: Path,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train on fresh renders, score held-out renders, save weights and metrics to `out`."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    scenes = sample_scenes(cfg.train_images + cfg.eval_images, cfg.seed, cfg.word_prob)
    train_s, eval_s = scenes[: cfg.train_images], scenes[cfg.train_images :]
    images = render_scenes(train_s, cfg.resolution, progress)
    targets = _stack_targets(train_s)
    t_data = time.time() - t0

    net = JudgeNet(cfg.resolution, cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.max_steps, pct_start=0.1
    )
    g = torch.Generator().manual_seed(cfg.seed)
    net.train()
    bar = tqdm(range(cfg.max_steps), desc="world_judge", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        x = to_input(augment(images[idx], cfg, g))
        if cfg.noise_std > 0:
            std = torch.rand(len(x), 1, 1, 1, generator=g) * cfg.noise_std
            x = x + std * torch.randn(x.shape, generator=g)
        loss = _loss(net(x), {k: v[idx] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.max_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log({"judge_loss": loss.item()}, step)
    t_train = time.time() - t0 - t_data

    judge = WorldJudge(net, cfg)
    eval_images = render_scenes(eval_s, cfg.resolution)
    accuracy = judge_accuracy(eval_s, judge.predict(eval_images))
    metrics = {
        "accuracy": accuracy,
        "robustness": robustness(judge, eval_s, eval_images),
        "min_accuracy": cfg.min_accuracy,
        "eval_images": cfg.eval_images,
        "final_loss": loss.item(),
        "seconds": {"render": round(t_data, 1), "train": round(t_train, 1)},
        "config": asdict(cfg),
    }
    save_judge(judge, out, metrics)
    if log:
        log({f"judge_accuracy_{k}": v for k, v in accuracy.items()}, cfg.max_steps)
        for name, acc in metrics["robustness"].items():
            log({f"judge_{name}_{k}": v for k, v in acc.items()}, cfg.max_steps)
    return metrics


def save_judge(judge: WorldJudge, out: Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in judge.net.state_dict().items()}
    write_atomic(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_text_atomic(out / CONFIG, json.dumps(asdict(judge.cfg), indent=2))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))


def load_judge(path: Path) -> WorldJudge:
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise MissingJudgeError(
            f"no world judge in {path} (expected {WEIGHTS} and {CONFIG}); materialize the "
            "world_judge asset or run `python -m models.evaluation.world_judge --out "
            + str(path)
            + "`"
        )
    cfg = JudgeConfig.from_dict(json.loads((path / CONFIG).read_text()))
    net = JudgeNet(cfg.resolution, cfg.width)
    net.load_state_dict(load_file(path / WEIGHTS))
    return WorldJudge(net, cfg)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, JudgeConfig)
    args = ap.parse_args()
    metrics = train_judge(config_from_args(JudgeConfig, args, "world_judge"), args.out)
    print(json.dumps(metrics["accuracy"], indent=2))


if __name__ == "__main__":
    main()
