"""Upsampling the DALL-E 3 report's way: an instruction-following LLM, used few-shot.

The report gives an LLM an instruction and a few (short prompt -> descriptive caption)
examples, then the user's prompt; open reproductions (caption-upsampling) do the same
with an open chat LLM. Here the instruction asks for this world's descriptive caption
style, the examples are the prompt suite's own short and descriptive forms (from its
reference scenes), and the LLM is any causal LM by hub id or local folder:
- with a chat template (an instruction-tuned model): system instruction, then each
  example as a user / assistant turn, then the query as the last user turn;
- without one (a base LM): the same as plain text, "Short: ...\\nDescriptive: ..." per
  example, the query's "Descriptive:" left open.
Each sample's first line is the expansion. Expansions are kept only when faithful to the
query (`models/expansion/faithfulness.py`), as for the trained expander.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.expansion.model import load_causal_lm

INSTRUCTION = (
    "You rewrite a short image prompt as one detailed caption of the picture. Keep every "
    "object, colour, count, place and word the prompt asks for; add only details it leaves "
    "open (sizes, places, the background). Answer with the caption alone, in one line."
)


def suite_examples(k: int = 4) -> list[tuple[str, str]]:
    """`k` (short, descriptive) pairs of the prompt suite, one per category in order."""
    from corpus.prompt_suite import load_suite

    seen, out = set(), []
    for p in load_suite():
        if p.category not in seen:
            seen.add(p.category)
            out.append((p.short, p.descriptive))
    return out[:k]


@dataclass
class FewShotUpsampler:
    model: torch.nn.Module
    tok: object
    examples: list[tuple[str, str]] = field(default_factory=suite_examples)
    max_new_tokens: int = 96

    def source(self, query: str) -> str:
        """The text the LLM continues for `query`."""
        if getattr(self.tok, "chat_template", None):
            messages = [{"role": "system", "content": INSTRUCTION}]
            for short, descriptive in self.examples:
                messages += [
                    {"role": "user", "content": short},
                    {"role": "assistant", "content": descriptive},
                ]
            messages.append({"role": "user", "content": query.strip()})
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        shots = "".join(f"Short: {s}\nDescriptive: {d}\n\n" for s, d in self.examples)
        return f"{INSTRUCTION}\n\n{shots}Short: {query.strip()}\nDescriptive:"

    @torch.no_grad()
    def expand(
        self,
        queries: list[str],
        n: int,
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: int = 0,
        batch_size: int = 16,
    ) -> list[list[str]]:
        """`n` sampled expansions per query (the first line of each sample)."""
        self.model.eval()
        self.tok.padding_side = "left"
        torch.manual_seed(seed)
        out: list[list[str]] = []
        for i in range(0, len(queries), batch_size):
            chunk = [self.source(q) for q in queries[i : i + batch_size]]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            ids = self.model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=self.tok.pad_token_id,
            )
            texts = self.tok.batch_decode(
                ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            lines = [(t.strip().splitlines() or [""])[0].strip() for t in texts]
            out += [lines[j : j + n] for j in range(0, len(lines), n)]
        return out


def load_few_shot(path_or_id: str | Path, examples: int = 4) -> FewShotUpsampler:
    """An instruction-following (or base) causal LM by hub id or local folder."""
    model, tok = load_causal_lm(
        path_or_id,
        "No model hub is reachable here: download the model elsewhere (e.g. "
        "`huggingface-cli download <instruct model>`), copy its folder to this machine "
        "and give its path.",
    )
    return FewShotUpsampler(model, tok, suite_examples(examples))
