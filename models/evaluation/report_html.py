"""The eval report as one HTML page next to its images (opens from disk in a browser).

Every piece of text that comes from prompts, captions or configs goes through
`html.escape`: prompts and captions are data, and web captions can carry markup.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from corpus.atomic import write_text_atomic
from models.evaluation.feedback_columns import MEASURES

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.6em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.fail{color:#b22}.pass{color:#183}img{max-width:100%}
.grids{display:flex;gap:1em;flex-wrap:wrap}.grids figure{margin:0}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _n(x: float) -> str:
    return f'<td class="n">{x:.3f}</td>'


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _partial_progress(metrics: dict, forms: list[str]) -> list[str]:
    """Attribute accuracy given that the object exists, and why images fail, per form."""
    forms = [f for f in forms if "attribute_accuracy" in metrics["forms"][f]]
    if not forms:
        return []
    ms = [metrics["forms"][f] for f in forms]
    kinds = list(ms[0]["attribute_judged"])
    rows = []
    for k in kinds:
        cells = "".join(
            (_n(m["attribute_accuracy"][k]) if k in m["attribute_accuracy"] else "<td>-</td>")
            + f"<td class='n'>{_e(m['attribute_judged'][k])}</td>"
            for m in ms
        )
        rows.append(f"<tr><td>{_e(k)}</td>{cells}</tr>")
    header = ["attribute"] + [h for f in forms for h in (f"{f}: accuracy", f"{f}: judged")]
    out = [
        "<h2>Attribute accuracy given that the object exists</h2>",
        "<p>Each attribute is scored only where what it belongs to is there (colour where "
        "an object of the prompted shape exists, count where one of the shape exists, "
        "relation where both objects exist); size, place and background only where the "
        "prompt states them (descriptive form). -: not judged.</p>",
        _table(header, rows),
    ]
    rows = []
    for r in ms[0]["failure_reasons"]["share_with_reason"]:
        cells = "".join(
            _n(m["failure_reasons"]["share_with_reason"][r])
            + _n(m["failure_reasons"]["share_primary"][r])
            for m in ms
        )
        rows.append(f"<tr><td>{_e(r)}</td>{cells}</tr>")
    failed = ", ".join(
        f"{_e(f)} {_e(m['failure_reasons']['failed'])} of {_e(m['failure_reasons']['images'])}"
        for f, m in zip(forms, ms, strict=True)
    )
    header = ["reason"] + [h for f in forms for h in (f"{f}: any", f"{f}: primary")]
    out += [
        "<h2>Why images fail</h2>",
        f"<p>Share of failed images ({failed}) with each reason (an image can have several) "
        "and whose first reason, in this order, it is.</p>",
        _table(header, rows),
    ]
    drawn = [m.get("drawn") for m in ms]
    if all(drawn):
        rows = []
        for scope, label in ((None, "all prompts"), ("one_object_prompts", "one-object prompts")):
            ds = [d[scope] if scope else d for d in drawn]
            for k, name in (
                ("objects_per_image", "objects per image"),
                ("asked_per_image", "objects asked per image"),
                ("asked_shape_share", "drawn objects of an asked shape"),
            ):
                cells = "".join("<td>-</td>" if d[k] is None else _n(d[k]) for d in ds)
                rows.append(f"<tr><td>{_e(label)}: {_e(name)}</td>{cells}</tr>")
        out += [
            "<h2>What is drawn</h2>",
            "<p>Every object the judge reads counts here, not the best of several guesses: "
            'an image with a star, a circle and a square passes the prompt "a star", and '
            "two of its three objects are of no asked shape.</p>",
            _table(["measure", *forms], rows),
        ]
    return out


def _opt(x: float | None) -> str:
    return "<td>-</td>" if x is None else _n(x)


def _feedback(metrics: dict, forms: list[str]) -> list[str]:
    """The feedback models' view of the same images, per form."""
    fb = {f: metrics["forms"][f]["feedback"] for f in forms if "feedback" in metrics["forms"][f]}
    if not fb:
        return []
    rows = []
    for f, m in fb.items():
        words = m.get("missed_words", {})
        cells = [m.get(k) for k, _ in MEASURES] + [words.get(k) for k in ("precision", "recall")]
        rows.append(
            f"<tr><td>{_e(f)}</td>"
            + "".join(f"<td class='n'>{x}</td>" if isinstance(x, int) else _opt(x) for x in cells)
            + f"{_opt(words.get('f1'))}</tr>"
        )
    header = ["prompt form", *(label for _, label in MEASURES), "missed words: precision",
              "recall", "F1"]  # fmt: skip
    return [
        "<h2>The feedback models on these images</h2>",
        "<p>The preference model (HPS v2 style) and the rich-feedback model (RAHF style) "
        "read the same images. Pass above fail: how often a score ranks an image that "
        "passes every condition above one of the same prompt that fails (0.5: chance; "
        "pairs: how many such pairs the form has). Missed words: the prompt words the "
        "rich-feedback model says the image missed, against those the world judge's "
        "reading says it missed. -: not measured or undefined. Upsampled images each have "
        "their own expansion, read by the models, and are judged by the short prompt: "
        "its pairs compare different texts, and a missed word may not be in the text.</p>",
        _table(header, rows),
    ]


def write_html_report(
    folder: Path, metrics: dict, records: list[dict], gate: dict | None = None
) -> Path:
    """Write `folder/index.html` for the report whose files are in `folder`."""
    forms = list(metrics["forms"])
    cats = list(metrics["forms"][forms[0]]["prompt_following"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>recapflow eval report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>recapflow eval report</h1>",
        f"<p>Model: <code>{_e(metrics['config']['model'])}</code>, "
        f"{_e(metrics.get('model_steps'))} training steps. Prompt suite "
        f"{_e(metrics['suite_version'])}: {_e(metrics['prompts'])} prompts x "
        f"{_e(metrics['images_per_prompt'])} images, in each form. An image passes only "
        "when every condition of its prompt holds in the scene the world judge reads.</p>",
    ]
    rows = []
    for f in forms:
        m = metrics["forms"][f]
        lo, hi = m["prompt_following_ci"]
        rows.append(
            f"<tr><td>{_e(f)}</td>{_n(m['prompt_following']['overall'])}"
            f"<td>[{lo:.3f}, {hi:.3f}]</td>{_n(m['clip_score'])}"
            f"<td class='n'>{_e(m['clip_truncated_prompts'])}</td></tr>"
        )
    parts += [
        "<h2>Summary</h2>",
        _table(
            [
                "prompt form",
                "prompt following (mean over categories)",
                "95% CI over prompts",
                "CLIP score",
                "prompts cut at CLIP's context",
            ],
            rows,
        ),
    ]
    if "upsampled" in metrics["forms"]:
        up = metrics["forms"]["upsampled"]
        lo, hi = up["minus_short_ci"]
        parts.append(
            "<p>Short prompts upsampled by the prompt expander, judged by the short prompt's "
            f"conditions: {up['minus_short']:+.3f} against the short form (95% CI "
            f"{lo:+.3f} to {hi:+.3f}, paired over prompts); {up['expanded_share']:.0%} of "
            "its images were drawn from a faithful expansion, the rest from the short "
            "prompt itself.</p>"
        )
    for note in metrics.get("notes", []):
        parts.append(f"<p><em>{_e(note)}</em></p>")
    if any(metrics["forms"][f].get("hps_v2") is not None for f in forms):
        parts.append(
            "<p>HPS v2 (mean cosine): "
            + ", ".join(f"{_e(f)} {metrics['forms'][f]['hps_v2']:.4f}" for f in forms)
            + "</p>"
        )
    if gate is not None:
        cls = "pass" if gate.get("promote") else "fail"
        parts.append(
            f"<h2>Regression gate</h2><p class='{cls}'>"
            f"{'promoted to champion' if gate.get('promote') else 'not promoted'}: "
            f"{_e(gate.get('reason', ''))}</p>"
        )
    rows = [
        f"<tr><td>{_e(c)}</td>"
        + "".join(_n(metrics["forms"][f]["prompt_following"][c]) for f in forms)
        + "</tr>"
        for c in cats
    ]
    parts += ["<h2>Prompt following by category</h2>", _table(["category", *forms], rows)]
    parts += _partial_progress(metrics, forms)
    parts += _feedback(metrics, forms)
    parts.append("<p><img src='plots/prompt_following.png' alt='prompt following'></p>")
    parts.append("<p><img src='plots/clip_score.png' alt='CLIP score'>")
    if (folder / "plots" / "training_curve.png").exists():
        parts.append(" <img src='plots/training_curve.png' alt='training curve'>")
    parts.append("</p>")

    judge = metrics.get("judge_accuracy", {})
    rows = [f"<tr><td>{_e(k)}</td>{_n(v)}</tr>" for k, v in judge.items()]
    parts += [
        "<h2>The evaluators' own accuracy</h2>",
        "<p>World judge on held-out ground-truth renders (its asset check requires 0.98 "
        "per attribute kind):</p>",
        _table(["attribute", "accuracy"], rows),
    ]
    rc = metrics.get("reference_clip", {})
    if rc:
        parts.append(
            "<p>Reference CLIP on held-out renders: image-to-text top-1 "
            f"{rc.get('image_to_text_top1', 0):.3f} among {_e(rc.get('eval_pairs'))} "
            f"(chance {rc.get('chance_top1', 0):.4f}); CLIP score of true pairs "
            f"{rc.get('clip_score_true_pairs', 0):.1f} against "
            f"{rc.get('clip_score_shuffled_pairs', 0):.1f} for shuffled pairs; context "
            f"length {_e(rc.get('context_length'))} tokens.</p>"
        )

    parts.append(
        "<h2>Images by category</h2><p>Green frame: passed; red: failed. Next to each "
        "grid, where a rich-feedback model was given, the same images with its predicted "
        "implausibility (red) and misalignment (blue) over them, and the words it says "
        "they missed.</p>"
    )
    grids = [
        (f"{c}-{f}{tail}", f"{f} prompts{label}", c)
        for c in cats
        for f in forms
        for tail, label in (("", ""), ("-feedback", ": rich feedback"))
        if (folder / "grids" / f"{c}-{f}{tail}.png").exists()
    ]
    for c in cats:
        figs = "".join(
            f"<figure><img src='grids/{_e(name)}.png' alt='{_e(c)} {_e(label)}'>"
            f"<figcaption>{_e(label)}</figcaption></figure>"
            for name, label, cat in grids
            if cat == c
        )
        parts.append(f"<h3>{_e(c)}</h3><div class='grids'>{figs}</div>")

    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_prompt.setdefault((r["prompt_id"], r["form"]), []).append(r)
    rows = []
    for (pid, form), rs in by_prompt.items():
        share = sum(r["passed"] for r in rs) / len(rs)
        failed = sorted({d for r in rs for d, ok in r["conditions"] if not ok})
        rows.append(
            f"<tr><td>{_e(pid)}</td><td>{_e(form)}</td><td>{_e(rs[0]['prompt'])}</td>"
            f"{_n(share)}<td>{_e('; '.join(failed))}</td></tr>"
        )
    parts += [
        "<h2>Every prompt</h2>",
        _table(["prompt", "form", "text", "passed", "conditions that failed"], rows),
        f"<p>Measured in {metrics['seconds']['total_s']:.0f} s. Settings: "
        f"<code>{_e(json.dumps(metrics['config']))}</code></p>",
        "</body></html>",
    ]
    path = folder / "index.html"
    write_text_atomic(path, "\n".join(parts))
    return path
