"""Prompts upsampled for drawing: each query becomes `n` expansions that keep every claim
of it, the query itself standing in for any that the expander could not write
faithfully, so nothing is drawn from a prompt that dropped or contradicted what was
asked. The eval report's `upsampled` form, the `generate` command and the pyfunc model
all draw through this."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Drawn:
    query: str  # what was asked for
    prompt: str  # what the generator is given
    expanded: bool  # False: the query itself (no expansion asked, or none was faithful)


def upsample(
    queries: list[str], n: int, expander, candidates: int = 16, seed: int = 0
) -> list[Drawn]:
    """`n` prompts per query, query-major: its faithful expansions among `candidates`
    samples of `expander`, then the query for each missing. `expander`: a trained
    expander's (model, tokenizer) pair, or a few-shot LLM (`few_shot.FewShotUpsampler`)."""
    from models.expansion.faithfulness import keep_faithful
    from models.expansion.model import expand

    k = max(n, candidates)
    if hasattr(expander, "expand"):
        sampled = expander.expand(queries, k, seed=seed)
    else:
        model, tok = expander
        sampled = expand(model, tok, queries, k, seed=seed)
    kept = keep_faithful(queries, sampled, n)
    rows = []
    for query, prompts in zip(queries, kept, strict=True):
        rows += [Drawn(query, p, True) for p in prompts]
        rows += [Drawn(query, query, False)] * (n - len(prompts))
    return rows
