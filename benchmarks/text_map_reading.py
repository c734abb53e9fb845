"""Does the caption reach the place it names? Three readings of a trained text-to-image
model (docs/log/2026-12-generator.md):

- placement: the suite's one-object descriptive prompts (single object, colour), drawn
  as the eval report draws them and read by the world judge: objects per image, the
  share of images with an object in the prompted cell, and where the drawn objects
  stand against that cell (chance for one object at random: exact 1/9, same row 2/9,
  same column 2/9, neither 4/9);
- the text map's attention (`unet.text_map`, models/diffusion/text_map.py) over the
  suite's descriptive prompts: how far apart the readings of the nine cell centres are
  (mean total-variation distance between their attention rows: 0, every place reads the
  same tokens), the attention mass on padding, and the tokens the two opposite corner
  cells read most for one caption;
- with `--work` (a training work folder whose last checkpoint holds a `map_head`, i.e.
  trained with `diffusion.map_loss`): the map's own drawing of those prompts, judged.

    python -m benchmarks.text_map_reading --model data/diffusion_model
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from corpus.prompt_suite import load_suite
from models.diffusion.autoencoder import to_uint8
from models.diffusion.text_to_image import load_text_to_image
from models.evaluation.world_judge import load_judge

CAPTION = (
    "A black background with a large purple diamond in the top left and a small green "
    "star in the bottom right."
)


PLACES = ("exact", "same row", "same column", "neither")


def placement(scenes, wanted) -> dict:
    """Where the judged objects of each scene stand against its wanted object's cell."""
    where, hit = collections.Counter(), 0
    for t, s in zip(wanted, scenes, strict=True):
        hit += any((o.row, o.col) == (t.row, t.col) for o in s.objects)
        for o in s.objects:
            same_row, same_col = o.row == t.row, o.col == t.col
            where[
                "exact" if same_row and same_col
                else "same row" if same_row
                else "same column" if same_col
                else "neither"
            ] += 1  # fmt: skip
    n = sum(where.values())
    return {
        "images": len(scenes),
        "objects_per_image": n / len(scenes),
        "prompted_cell_filled": hit / len(scenes),
        "objects_at": {k: where[k] / max(n, 1) for k in PLACES},
    }


def _centres(side: int) -> list[int]:
    """Flat latent positions of the 3x3 grid's cell centres."""
    at = [int((i + 0.5) * side / 3) for i in range(3)]
    return [r * side + c for r in at for c in at]


def cell_reading_distance(weights: torch.Tensor, side: int) -> float:
    """Mean total-variation distance between the attention rows (B, side^2, L) of the
    nine cell centres: 0 when every place reads the same tokens, 1 when none share any."""
    centres = weights[:, _centres(side)]
    pairs = itertools.combinations(range(9), 2)
    tv = [0.5 * (centres[:, i] - centres[:, j]).abs().sum(-1) for i, j in pairs]
    return torch.stack(tv).mean().item()


def _map_attention(tm, states: torch.Tensor) -> torch.Tensor:
    """The text map's attention weights (B, side^2, L), averaged over its heads."""
    q = tm.queries(states.dtype).expand(len(states), -1, -1)
    return tm.attn(q, states, states, need_weights=True, average_attn_weights=True)[1]


@torch.no_grad()
def attention(pipe, texts: list[str]) -> dict:
    tm, te = pipe.unet.text_map, pipe.text_encoder
    states, _ = te(texts)
    w = _map_attention(tm, states)
    lengths = [len(te.tokenizer(t)["input_ids"]) for t in texts]
    pad = torch.stack([w[b, :, n:].sum(-1).mean() for b, n in enumerate(lengths)])
    return {
        "cell_reading_distance": cell_reading_distance(w, tm.side),
        "padding_mass": pad.mean().item(),
    }


def _map_states(pipe, texts: list[str]) -> torch.Tensor:
    """The token states the map reads (through the UNet's binder, if it has one)."""
    return pipe.unet.bound_states(pipe.text_encoder(texts)[0])


@torch.no_grad()
def corner_tokens(pipe, k: int = 5) -> dict:
    tm, te = pipe.unet.text_map, pipe.text_encoder
    states = _map_states(pipe, [CAPTION])
    w = _map_attention(tm, states)
    ids = te.tokenizer(CAPTION, padding="max_length", max_length=te.context_length)["input_ids"]
    words = te.tokenizer.convert_ids_to_tokens(ids[: te.context_length])
    centres = _centres(tm.side)
    out = {}
    for name, pos in (("top left", centres[0]), ("bottom right", centres[-1])):
        values, at = w[0, pos].topk(k)
        out[name] = [(words[i], round(v.item(), 3)) for v, i in zip(values, at, strict=True)]
    return out


@torch.no_grad()
def map_drawing(pipe, work: Path, texts: list[str]) -> torch.Tensor:
    states = _map_states(pipe, texts)
    if pipe.unet.config.get("text_map_draws"):  # the exported UNet holds the map's head
        z = pipe.unet.map_draw(pipe.unet.text_map(states))
        return to_uint8(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.float())
    ckpt = work / "checkpoints" / (work / "checkpoints" / "latest").read_text().strip()
    w = load_file(str(ckpt / "model.safetensors"))
    if "model.map_head.weight" not in w:
        raise SystemExit(f"{ckpt} has no map_head: the run did not train with diffusion.map_loss")
    weight, bias = w["model.map_head.weight"], w["model.map_head.bias"]
    head = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    z = head(pipe.unet.text_map(states))
    return to_uint8(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.float())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an exported text-to-image folder")
    ap.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    ap.add_argument("--work", type=Path, help="its training work folder (map_loss runs)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    args = ap.parse_args(argv)
    pipe, judge = load_text_to_image(args.model), load_judge(args.judge)
    suite = load_suite(Path("prompts/suite-v1.json"))
    one = [p for p in suite if p.category in ("single_object", "colour")]
    k = args.images_per_prompt
    with torch.inference_mode():
        prompts = [p.descriptive for p in one for _ in range(k)]
        images = pipe(prompts, seed=0, guidance_scale=args.guidance)
    wanted = [p.scene.objects[0] for p in one for _ in range(k)]
    res = {"drawn": placement(judge.predict(images), wanted)}
    res["text_map"] = {
        **attention(pipe, [p.descriptive for p in suite]),
        "corner_tokens": corner_tokens(pipe),
    }
    if args.work:
        drawing = map_drawing(pipe, args.work, [p.descriptive for p in one])
        res["map_drawing"] = placement(judge.predict(drawing), [p.scene.objects[0] for p in one])
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
