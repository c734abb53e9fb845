"""How well can a scorer that reads the prompt agree with the pool's annotators?

The exact ceiling (`utility.bayes_ceiling`) assumes a scorer that knows each annotator's
utility. A scorer knows only the prompt's text and the images. Where the annotators judge
a descriptive prompt by its category's conditions (the suite's rule), the text does not
tell which those are: "a red circle and a blue square, the circle left of the square" is
the descriptive form of a two-objects prompt (shapes count), a colour-binding one
(colours count) and a position one (the relation counts). This prints, on the pool's
test pairs, the exact ceiling and the best agreement of a reader of the text, under the
two rules an annotator can judge by:

- category: the suite's conditions of the prompt's category, whatever the form;
- stated: what the text states (`corpus.prompt_suite.stated_conditions`).

The reader knows every image's judged scene and plausibility and the prior over the
categories a descriptive text can come from (the suite draws categories alike; a pair of
objects sharing a row or column is as likely as not for two-objects and colour-binding
scenes, certain for position ones), and picks the image its expected choice favours.

    python -m benchmarks.prompt_reader_ceiling [--pool data/feedback_pool]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from corpus.prompt_suite import Condition, Prompt, condition_holds, stated_conditions
from corpus.world import Scene
from models.feedback.pool import load_pool
from models.feedback.utility import UtilityConfig, choice_probability, utility


def category_readings(p: Prompt, form: str) -> list[tuple[tuple[Condition, ...], float]]:
    """(conditions, prior weight) of each category the prompt's text may come from,
    judged by the suite's rule."""
    if form == "short":  # the short form names its category's conditions exactly
        return [(p.conditions, 1.0)]
    objs = p.scene.objects
    if p.category in ("single_object", "colour"):
        (o,) = objs
        return [
            ((Condition("object", shape=o.shape),), 0.5),
            ((Condition("object", shape=o.shape, colour=o.color),), 0.5),
        ]
    if p.category in ("two_objects", "colour_binding", "position"):
        a, b = objs
        shapes = (Condition("object", shape=a.shape), Condition("object", shape=b.shape))
        colours = tuple(Condition("object", shape=o.shape, colour=o.color) for o in (a, b))
        rel = None
        if a.row == b.row:
            rel = "left of" if a.col < b.col else "right of"
        elif a.col == b.col:
            rel = "above" if a.row < b.row else "below"
        if rel is None:  # objects off one line: never a position prompt
            return [(shapes, 0.5), (colours, 0.5)]
        relation = Condition("relation", shape=a.shape, relation=rel, other_shape=b.shape)
        return [(shapes, 0.25), (colours, 0.25), ((relation,), 1.0)]
    return [(p.conditions, 1.0)]  # counting and word texts name their category


def _utility(conds, label: dict, cfg: UtilityConfig) -> float:
    """U of a labelled image judged by `conds` instead of the label's own conditions."""
    scene = Scene.from_dict(label["scene"])
    return utility({**label, "conditions": [condition_holds(c, scene) for c in conds]}, cfg)


def ceilings(pool_dir: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per (rule, form): per test pair, the exact ceiling and the reader's expected
    agreement. The annotators' noise is the pool's tau under either rule."""
    pool = load_pool(pool_dir)
    cfg = pool.config.utility
    prompts = [Prompt.from_dict(q["prompt"]) for q in pool.prompts]
    forms = [q["form"] for q in pool.prompts]
    pr = pool.pairs
    out: dict = defaultdict(lambda: {"exact": [], "reader": []})
    for k in np.flatnonzero((pr["split"] == "test") & ~pr["held_out"]):
        q, ia, ib = pr["prompt"][k], pr["a"][k], pr["b"][k]
        p, form = prompts[q], forms[q]

        def p_a(conds, ia=ia, ib=ib):
            u = [_utility(conds, pool.labels[i], cfg) for i in (ia, ib)]
            return float(choice_probability(u[0], u[1], pool.tau))

        rules = {
            "category": (p_a(p.conditions), category_readings(p, form)),
            "stated": (p_a(stated_conditions(p, form)), [(stated_conditions(p, form), 1.0)]),
        }
        for rule, (truth, readings) in rules.items():
            weights = np.array([w for _, w in readings])
            expected = float(np.dot([p_a(c) for c, _ in readings], weights) / weights.sum())
            reader = truth if expected > 0.5 else 1 - truth if expected < 0.5 else 0.5
            for key in ((rule, form), (rule, "all")):
                out[key]["exact"].append(max(truth, 1 - truth))
                out[key]["reader"].append(reader)
    return {k: {m: np.array(v) for m, v in d.items()} for k, d in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=Path("data/feedback_pool"))
    args = ap.parse_args()
    print("| annotators judge by | test pairs | n | exact ceiling | best reader of the text |")
    print("|---|---|---:|---:|---:|")
    for (rule, form), d in sorted(ceilings(args.pool).items()):
        n, exact, reader = len(d["exact"]), d["exact"].mean(), d["reader"].mean()
        print(f"| {rule} | {form} | {n} | {exact:.3f} | {reader:.3f} |")


if __name__ == "__main__":
    main()
