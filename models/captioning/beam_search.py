"""Beam search over a causal LM's KV cache, written out for recaptioning's throughput.

The rules are transformers' beam search with its defaults (length_penalty 1, early_stopping
False): each step ranks every beam's continuations by summed log-probability, keeps the
best `num_beams` that do not end, and files an ending as a finished caption (score: summed
log-probability over its length) when it ranks within the best `num_beams`; an image's
search is over once it has `num_beams` finished captions and none of its running beams,
at its current length, could score above the worst of them.

What it does differently, and why (docs/log/2026-12-speed.md):
- an image whose search is over leaves the batch, with its rows of the KV cache, where
  transformers decodes every row until the batch's longest search is over;
- each beam carries its text, so the clause check reads it without decoding;
- a false claim is charged to the beam's score when its token is kept, which ranks the
  beam at the next step exactly as transformers' logits processors do;
- with `lookahead`, a step's candidates are ranked as if their last word were complete,
  which a logits processor cannot do (it sees the beams, not the candidates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.captioning.verified_search import PENALTY, ClauseCheck


@torch.no_grad()
def beam_search(
    lm: nn.Module,
    prefix: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int,
    suppress_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    num_return_sequences: int = 1,
    check: ClauseCheck | None = None,
    lookahead: bool = False,
) -> list[list[int]]:
    """Token ids (without EOS) of the best `num_return_sequences` captions per image,
    best first, image-major; `prefix` (B, P, hidden) is what the LM reads before them."""
    n_img, k = len(prefix), num_beams
    out = lm(inputs_embeds=prefix, use_cache=True)
    cache = out.past_key_values
    rows = torch.arange(n_img, device=prefix.device).repeat_interleave(k)
    cache.reorder_cache(rows)
    logp = out.logits[rows, -1].float().log_softmax(-1)
    # All beams of an image start equal: only the first may continue at the first step.
    scores = torch.zeros(n_img, k, device=prefix.device)
    scores[:, 1:] = -1e9
    active = list(range(n_img))  # images still searched, in row order (k rows each)
    ids: list[list[int]] = [[] for _ in range(n_img * k)]
    texts = [""] * (n_img * k)
    row_images = [image for image in range(n_img) for _ in range(k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_img)]
    for t in range(max_new_tokens):
        logp[:, list(suppress_tokens)] = -float("inf")
        if t < min_new_tokens:
            logp[:, eos_token_id] = -float("inf")
        if check is not None and t > 0:
            at_end = check.charge_end(row_images, texts, check.may_end(logp))
            logp[:, eos_token_id] -= PENALTY * torch.tensor(at_end, device=logp.device)
        cand = (scores.view(-1, 1) + logp).view(len(active), -1)
        top, index = cand.topk(2 * k, dim=1)
        vocab = logp.shape[-1]
        first_row = torch.arange(len(active), device=index.device)[:, None] * k
        parent_of = (first_row + index // vocab).tolist()
        tokens = (index % vocab).tolist()
        top = top.tolist()
        if check is not None and lookahead and t > 0:
            top, parent_of, tokens = _look_ahead(
                check, top, parent_of, tokens, texts, ids, row_images, eos_token_id, k
            )
        candidates = zip(top, parent_of, tokens, strict=True)
        keep, still = [], []  # (score, parent row, token) of the next beams; their images
        for image, options in zip(active, candidates, strict=True):
            beams = []
            for rank, (s, parent, tok) in enumerate(zip(*options, strict=True)):
                if tok != eos_token_id:
                    beams.append((s, parent, tok))
                elif rank < k:
                    finished[image].append((s / (t + 1), ids[parent]))
                if len(beams) == k:
                    break
            finished[image] = sorted(finished[image], key=lambda h: -h[0])[:k]
            worst = finished[image][-1][0] if len(finished[image]) == k else -float("inf")
            if worst < beams[0][0] / (t + 1):  # a running beam may still beat it
                still.append(image)
                keep.extend(beams)
        if not still:
            break
        parent_rows = [p for _, p, _ in keep]
        new_ids = [ids[p] + [tok] for _, p, tok in keep]
        scores = torch.tensor([s for s, _, _ in keep], device=prefix.device)
        row_images = [image for image in still for _ in range(k)]
        if check is not None:
            parents = [texts[p] for p in parent_rows]
            texts = [check.extend(parent, i) for parent, i in zip(parents, new_ids, strict=True)]
            added = check.charge(row_images, texts, parents)
            scores -= PENALTY * torch.tensor(added, device=scores.device).clamp(min=0)
        scores = scores.view(len(still), k)
        active, ids = still, new_ids
        cache.reorder_cache(torch.tensor(parent_rows, device=prefix.device))
        step = torch.tensor([[tok] for _, _, tok in keep], device=prefix.device)
        logp = lm(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
        logp = logp.float().log_softmax(-1)
    else:  # out of tokens: running beams count as finished captions
        for a, image in enumerate(active):
            for b in range(k):
                finished[image].append((scores[a, b].item() / max_new_tokens, ids[a * k + b]))
    best = []
    for hyps in finished:
        hyps = sorted(hyps, key=lambda h: -h[0])[:num_return_sequences]
        best.extend(h for _, h in hyps)
    return best


def _look_ahead(
    check: ClauseCheck,
    top: list[list[float]],
    parent_of: list[list[int]],
    tokens: list[list[int]],
    texts: list[str],
    ids: list[list[int]],
    row_images: list[int],
    eos: int,
    k: int,
) -> tuple[list[list[float]], list[list[int]], list[list[int]]]:
    """Each image's candidates of the step reranked as if the word each one ends were
    complete: a false claim is then charged when its last word is written, while the
    candidates that avoid it are still there, not one token later when every beam may
    hold it. Only the order changes; a kept beam is charged when its words settle.
    Candidates are read best first until `k` that may continue state nothing false: the
    rest cannot be kept."""
    out_top, out_parent, out_tok = [], [], []
    for scores, parents, toks in zip(top, parent_of, tokens, strict=True):
        clean, charged, clean_beams = [], [], 0
        for s, parent, tok in zip(scores, parents, toks, strict=True):
            if clean_beams == k:
                break
            if tok == eos:  # its end is charged already (ClauseCheck.charge_end)
                clean.append((s, parent, tok))
                continue
            text = check.extend(texts[parent], ids[parent] + [tok])
            false = check.look_ahead(row_images[parent], text, texts[parent])
            if false:  # ranked as charged, scored as before: settling charges it
                charged.append((s - PENALTY * false, s, parent, tok))
            else:
                clean.append((s, parent, tok))
                clean_beams += 1
        ranked = clean + [r[1:] for r in sorted(charged, key=lambda r: -r[0])]
        out_top.append([r[0] for r in ranked])
        out_parent.append([r[1] for r in ranked])
        out_tok.append([r[2] for r in ranked])
    return out_top, out_parent, out_tok
