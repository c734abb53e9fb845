"""Faithfulness learnt from the expander's own samples: iterative DPO with the exact check
as the verifier.

Supervised fine-tuning shows the expander only faithful pairs (the inversion dataset is
faithful by construction), yet its samples still drop or turn round a claim, most often
a relation: asked for "a star above a square", it writes "The square is above the star."
Each round here samples the model's expansions of training queries, labels each with the
exact check of `faithfulness.py`, and trains on (faithful, unfaithful) expansions of the
same query with DPO (Rafailov et al. 2023) plus the faithful one's likelihood, the
iterative recipe of Pang et al. 2024 (Iterative RPO): each round's reference is the model
that began it, so the model moves a bounded step from where it was. The verifier is exact,
so no learnt reward stands between the check and the model.

Queries are the training split's `<abst>` and `<dtl>` queries and the short forms of a
prompt suite drawn from this step's own seed; a short prompt of the eval suite never is
one, so the suite measures prompts the model was not optimised on.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from corpus.prompt_suite import build_suite
from models.expansion.faithfulness import coherent, faithful
from models.expansion.model import expand
from models.expansion.queries import Pair


@dataclass(frozen=True)
class DPOConfig:
    rounds: int = 0  # 0: the supervised expander as it is
    queries: int = 1000  # training-split queries per round
    suite_per_category: int = 400  # a prompt suite of this step's seed: its short forms
    samples: int = 8  # expansions per query per round
    steps: int = 300  # per round
    batch_size: int = 32  # (faithful, unfaithful) pairs per step
    lr: float = 1e-4
    beta: float = 0.1  # DPO's: how far the log-ratio to the reference is pushed
    nll_weight: float = 1.0  # the faithful expansion's mean token log-likelihood
    seed: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.samples < 2 or self.beta <= 0:
            raise ValueError(
                "prompt_expander.dpo needs rounds >= 0, samples >= 2 and beta > 0, got "
                f"rounds={self.rounds}, samples={self.samples}, beta={self.beta}"
            )


def dpo_queries(train: list[Pair], eval_short: list[str], cfg: DPOConfig) -> tuple[list[str], int]:
    """The queries to optimise on, and how many suite-like ones were left out because the
    eval suite holds them."""
    if not cfg.rounds:
        return [], 0
    asked = set(eval_short)
    pool = sorted({p.query for p in train if p.prefix in ("<abst>", "<dtl>")} - asked)
    random.Random(cfg.seed).shuffle(pool)
    drawn = {p.short for p in build_suite(cfg.suite_per_category, cfg.seed)}
    return pool[: cfg.queries] + sorted(drawn - asked), len(drawn & asked)


def preference_pairs(
    queries: list[str], sampled: list[list[str]]
) -> tuple[list[tuple[str, str, str]], dict[str, float]]:
    """(query, faithful, unfaithful) triples: each unfaithful expansion of a query against
    one of its faithful and coherent ones, in turn; and the shares of what was sampled."""
    triples, n, bad, incoherent = [], 0, 0, 0
    for q, xs in zip(queries, sampled, strict=True):
        kept = [(x, faithful(q, x), coherent(x)) for x in xs]  # each text parsed once per check
        good = [x for x, f, c in kept if f and c]
        wrong = [x for x, f, _ in kept if not f]
        triples += [(q, good[j % len(good)], x) for j, x in enumerate(wrong)] if good else []
        n, bad = n + len(xs), bad + len(wrong)
        incoherent += sum(not c for *_, c in kept)
    shares = {"unfaithful": bad / max(n, 1), "incoherent": incoherent / max(n, 1)}
    return triples, shares


def sequence_logp(model, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor):
    """Per row: the summed log-probability of its labelled tokens, and their number."""
    logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
    target = y[:, 1:]
    keep = target != -100
    logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1))
    return (logp.squeeze(-1) * keep).sum(1), keep.sum(1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss over a batch of sequence log-probabilities, and the share of pairs whose
    implicit reward already ranks the faithful expansion first."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float().mean()


def optimise_faithfulness(
    model,
    tok,
    queries: list[str],
    cfg: DPOConfig,
    batch: Callable[[list[tuple[str, str]]], tuple[torch.Tensor, ...]],
    sampling: dict,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """`cfg.rounds` rounds of sample, check, DPO; per round what was sampled and learnt.
    `batch` turns (query, expansion) pairs into ids, mask and labels as training does."""
    rounds = []
    for r in range(cfg.rounds):
        sampled = expand(model, tok, queries, cfg.samples, None, seed=cfg.seed + r, **sampling)
        triples, shares = preference_pairs(queries, sampled)
        stats = {"round": r, "pairs": len(triples)} | {f"sampled_{k}": v for k, v in shares.items()}
        if triples:
            stats |= dpo_round(model, triples, cfg, batch, r, log, progress)
        rounds.append(stats)
    model.eval()
    return rounds


def dpo_round(
    model,
    triples: list[tuple[str, str, str]],
    cfg: DPOConfig,
    batch: Callable[[list[tuple[str, str]]], tuple[torch.Tensor, ...]],
    r: int = 0,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> dict:
    """One round of DPO on (query, faithful, unfaithful) triples against a frozen copy of
    the model as it begins; the last step's DPO loss, the faithful expansions' mean
    token negative log-likelihood, and the share of pairs ranked right."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    # The model trains with its dropout, as in fine-tuning; the reference reads without.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + r)
    last: dict[str, float] = {}
    desc = f"prompt_expander dpo {r + 1}/{cfg.rounds}"
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        chosen = rng.choices(triples, k=cfg.batch_size)
        x, mask, y = batch([(q, c) for q, c, _ in chosen] + [(q, w) for q, _, w in chosen])
        logp, n = sequence_logp(model, x, mask, y)
        with torch.no_grad():
            ref, _ = sequence_logp(reference, x, mask, y)
        k = cfg.batch_size
        loss, ranked = dpo_loss(logp[:k], logp[k:], ref[:k], ref[k:], cfg.beta)
        nll = -(logp[:k] / n[:k]).mean()
        opt.zero_grad(set_to_none=True)
        (loss + cfg.nll_weight * nll).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = {"dpo_loss": loss.item(), "dpo_nll": nll.item(), "dpo_ranked": ranked.item()}
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", ranked=f"{ranked.item():.2f}")
            if log:
                log(last, r * cfg.steps + step)
    return last
