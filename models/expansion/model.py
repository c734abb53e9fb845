"""The prompt expander: a causal LM that continues "<bos> [prefix] query <sep>" with an
expanded prompt. `tiny` builds a small GPT-2 on the corpus's own BPE; `full` loads any
causal LM by hub id or folder (a Promptist-style GPT-2) through the same
`AutoModelForCausalLM` / `AutoTokenizer` calls, and both are fine-tuned and sampled
alike. The prefixes and the separator are added to any tokenizer as special tokens.

A query's quoted word ('the word "CAT"') is copied, not generated: the expander sees the
special token `<word>` in its place, learns to write `<word>` wherever its prompt states
the query's word, and the word goes back in after sampling (delexicalisation, as
data-to-text generators treat names and numbers). A small LM writes the word tens of
tokens after reading it and otherwise picks any word it has seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerBase

from models.common.tokenizer import load_tokenizer, train_bpe_tokenizer
from models.expansion.faithfulness import keep_faithful
from models.expansion.queries import PREFIXES

SEP = "<sep>"
WORD = "<word>"
_QUOTED = re.compile(r'"([^"]+)"')


class MissingExpanderError(FileNotFoundError):
    """A prompt expander folder or hub id that cannot be loaded here."""


@dataclass(frozen=True)
class LMConfig:
    """The tiny GPT-2's sizes (ignored when `pretrained` names a model)."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 1024
    max_length: int = 160  # tokens of prefix, query, separator and prompt together
    # GPT-2's three dropouts (embeddings, residuals, attention) at once. 0 trains faster on
    # a CPU (attention takes the fused path) but the expansions of short prompts drop more
    # of their claims (docs/log/2026-12-speed.md).
    dropout: float = 0.1


def add_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    tok.add_special_tokens({"additional_special_tokens": [*PREFIXES, SEP, WORD]})


def word_slot(tok: PreTrainedTokenizerBase) -> int | None:
    """The id of `<word>`, or None for an expander trained without it (then words are
    generated as any other token)."""
    i = tok.convert_tokens_to_ids(WORD)
    return None if i is None or i == tok.unk_token_id else i


def quoted_word(query: str) -> str | None:
    """The word a query quotes, when it quotes exactly one."""
    found = _QUOTED.findall(query)
    return found[0] if len(found) == 1 else None


def delexicalise(text: str, word: str | None) -> str:
    """`text` with the quoted `word` as `<word>`."""
    return text if word is None else text.replace(f'"{word}"', f'"{WORD}"')


def new_expander(cfg: LMConfig, texts: list[str], seed: int):
    """A randomly initialised GPT-2 and a BPE trained on `texts`."""
    tok = train_bpe_tokenizer(texts, cfg.vocab_size)
    add_special_tokens(tok)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=cfg.max_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
    )
    return AutoModelForCausalLM.from_config(config), tok


def load_causal_lm(path_or_id: str | Path, remedy: str):
    """A causal LM and its tokenizer by hub id or local folder; a load that fails names
    the model and what to do (`remedy`), never falls back to another model."""
    try:
        tok = load_tokenizer(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id))
    except OSError as e:
        raise MissingExpanderError(
            f"cannot load a causal LM from {path_or_id!r} ({e}). {remedy}"
        ) from e
    return model, tok


def load_expander(path_or_id: str | Path):
    """A saved expander folder, or a pretrained causal LM by hub id or folder (then its
    tokenizer gets the prefixes and the separator, and its embeddings grow to match)."""
    model, tok = load_causal_lm(
        path_or_id,
        "Offline, set prompt_expander.pretrained to a local folder saved with "
        "save_pretrained, or to null to train the tiny expander.",
    )
    if SEP not in tok.get_vocab():
        add_special_tokens(tok)
        model.resize_token_embeddings(len(tok))
    return model, tok


def source_text(
    query: str, prefix: str | None, tok: PreTrainedTokenizerBase, slot: bool = False
) -> str:
    """What the expander is given; None: no prefix (the model picks the level); `slot`:
    the quoted word as `<word>`."""
    head = f"{prefix} " if prefix else ""
    if slot:
        query = delexicalise(query, quoted_word(query))
    return f"{tok.bos_token}{head}{query.strip()} {SEP}"


@torch.no_grad()
def expand(
    model,
    tok: PreTrainedTokenizerBase,
    queries: list[str],
    n: int,
    prefix: str | None = None,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """`n` sampled expansions of each query; the same seed gives the same texts."""
    if prefix is not None and prefix not in PREFIXES:
        raise ValueError(f"unknown prefix {prefix!r}; expected one of {PREFIXES} or None")
    model.eval()
    tok.padding_side = "left"
    torch.manual_seed(seed)
    slot = word_slot(tok)
    out: list[list[str]] = []
    for i in range(0, len(queries), batch_size):
        batch = queries[i : i + batch_size]
        chunk = [source_text(q, prefix, tok, slot is not None) for q in batch]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ids = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        rows = ids[:, enc["input_ids"].shape[1] :].tolist()
        if slot is not None:
            words = [quoted_word(q) for q in batch]
            rows = [_fill_word(r, slot, words[j // n], tok) for j, r in enumerate(rows)]
        texts = [t.strip() for t in tok.batch_decode(rows, skip_special_tokens=True)]
        out += [texts[j : j + n] for j in range(0, len(texts), n)]
    return out


def _fill_word(ids: list[int], slot: int, word: str | None, tok) -> list[int]:
    """A sampled row with `<word>` replaced by the query's word (dropped, as any special
    token, when the query quotes none)."""
    if word is None or slot not in ids:
        return ids
    fill = tok(word, add_special_tokens=False)["input_ids"]
    return [t for i in ids for t in (fill if i == slot else [i])]


def expand_faithfully(
    model, tok: PreTrainedTokenizerBase, queries: list[str], n: int, candidates: int, **sampling
) -> tuple[list[list[str]], int]:
    """Up to `n` expansions of each query that keep every claim of it (the caption
    metrics check each of `candidates` samples, in order), and how many queries got
    fewer than `n`. The check is exact and cheap, so it runs at every use, as the
    re-fine-tuning filter of Prompt Expansion runs once on its training pairs."""
    kept = keep_faithful(queries, expand(model, tok, queries, max(n, candidates), **sampling), n)
    return kept, sum(len(k) < n for k in kept)
