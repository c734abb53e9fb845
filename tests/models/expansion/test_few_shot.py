"""The report's upsampling: an LLM given an instruction and examples, loaded like any
causal LM (here a tiny random GPT-2 saved locally), its expansions checked for faithfulness."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.common.tokenizer import train_bpe_tokenizer
from models.expansion.few_shot import INSTRUCTION, load_few_shot, suite_examples
from models.expansion.model import MissingExpanderError
from models.expansion.upsample import upsample

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _save_lm(folder, chat_template=None):
    tok = train_bpe_tokenizer([INSTRUCTION] + [" ".join(p) for p in suite_examples()], 400)
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=2048, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_base_lm_gets_the_instruction_and_examples_as_plain_text(tmp_path):
    up = load_few_shot(_save_lm(tmp_path / "base"))
    text = up.source("a red star")
    assert text.startswith(INSTRUCTION)
    short, descriptive = suite_examples()[0]
    assert f"Short: {short}\nDescriptive: {descriptive}\n" in text
    assert text.endswith("Short: a red star\nDescriptive:")
    up.max_new_tokens = 4
    out = up.expand(["a red star", "two circles"], n=3)
    assert [len(x) for x in out] == [3, 3] and all("\n" not in t for x in out for t in x)


def test_an_instruction_model_gets_its_chat_template_with_the_examples_as_turns(tmp_path):
    up = load_few_shot(_save_lm(tmp_path / "chat", CHAT), examples=2)
    text = up.source("a blue square")
    short, descriptive = suite_examples()[1]
    assert text.startswith(f"<|system|>{INSTRUCTION}")
    assert f"<|user|>{short}\n<|assistant|>{descriptive}\n" in text
    assert text.endswith("<|user|>a blue square\n<|assistant|>")


def test_upsampling_keeps_only_faithful_expansions_whatever_the_expander():
    class Fixed:  # an expander object, as a few-shot LLM is
        def expand(self, queries, n, seed=0):
            return [
                [
                    "A large green star in the center, on a white background.",
                    "A large red star in the center, on a white background.",
                ]
            ]

    rows = upsample(["a red star"], 2, Fixed(), candidates=2)
    assert [(r.prompt, r.expanded) for r in rows] == [
        ("A large red star in the center, on a white background.", True),
        ("a red star", False),  # the unfaithful one (green) is replaced by the query
    ]


def test_a_missing_llm_says_how_to_provide_it(tmp_path):
    with pytest.raises(MissingExpanderError, match="copy its folder"):
        load_few_shot(tmp_path / "nothing")
