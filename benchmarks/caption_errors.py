"""What the captioner's descriptive captions still state falsely, and whether the check
could have known: per kind of false claim, how many held-out captions hold one, and how
many of those the concept heads' own scene also finds false (the check sees that scene,
not the truth) while the heads read every object and its cell right.

    python -m benchmarks.caption_errors [--no-lookahead] [--images 500]

A kind that the heads' scene also finds false, in images the heads read right, is one the
search could have avoided and did not: a decoding problem. A kind the heads' scene finds
true is the heads' error. "Read right": every object's shape, colour and cell (not its
size, nor the word). Background is the exception: no head predicts it, so the heads'
scene finds every background claim false, and the check leaves background out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.recaption_throughput import held_out, held_out_parser
from corpus.caption_metrics import KINDS, SceneTruth, extract_claims, false_claims, score_caption
from corpus.params import load_section
from models.captioning.captioner import GenerationConfig, PrefixCaptioner
from models.captioning.concepts import GRID, predicted_scenes
from models.captioning.train import caption_images, read_scenes
from models.common.clip import cell_tokens
from models.common.data import load_images


def _objects(scene) -> list[tuple]:
    return sorted((o.shape, o.color, o.row, o.col) for o in scene.objects)


def main(argv: list[str] | None = None) -> dict:
    ap = held_out_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--no-lookahead", action="store_true", help="decode without look-ahead")
    args = ap.parse_args(argv)
    gen = GenerationConfig(**load_section(args.params, "captioner")["generation"])
    if args.no_lookahead:
        gen = replace(gen, lookahead=False)
    model = PrefixCaptioner.load(Path(args.captioner) / "dsc").eval()
    keys, shards = held_out(Path(args.raw), args.images)
    truths = read_scenes(Path(args.raw), keys, shards)
    images = load_images(Path(args.raw), keys, shards, model.image_size)
    captions = caption_images(model, images, gen)
    with torch.no_grad():
        _, grid = model._features(images)
        cells = cell_tokens(grid, GRID)
        seen = predicted_scenes({k: head(cells) for k, head in model.cell_heads.items()})
    false, heads_knew = Counter(), Counter()
    for caption, truth, heads in zip(captions, truths, seen, strict=True):
        score = score_caption(caption, truth)
        kinds = [k for k in KINDS if score[k]["n_claims"] > score[k]["n_true"]]
        by_heads = false_claims(extract_claims(caption), SceneTruth.of(heads))
        read_right = _objects(heads) == _objects(truth)
        for k in kinds:
            false[k] += 1
            heads_knew[k] += bool(read_right and by_heads[k])
        false["any"] += bool(kinds)
    print(f"{len(captions)} held-out DSC captions, lookahead={gen.lookahead}")
    print("| false claim | captions | of them, heads read the objects right and find it false |")
    print("|---|---:|---:|")
    for k in ["any", *KINDS]:
        if false[k]:
            print(f"| {k} | {false[k]} | {heads_knew[k] if k != 'any' else ''} |")
    return {"captions": len(captions), "false": dict(false), "heads_knew": dict(heads_knew)}


if __name__ == "__main__":
    main()
