"""The captioner of the DALL-E 3 report: a causal language model conditioned on a CLIP
image embedding. The CLIP image tower's pooled embedding and its patch tokens are
projected into the LM's embedding space and prepended as prefix tokens (ClipCap-style);
the LM then writes the caption after a BOS token.

Generation is batched: every prefix has the same length, so a batch of images decodes
together with the LM's KV cache, greedily, with beam search or with nucleus sampling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from models.captioning.beam_search import beam_search
from models.captioning.concepts import GRID as CONCEPT_GRID
from models.captioning.concepts import most_consistent, predicted_scenes
from models.captioning.verified_search import ClauseCheck
from models.common.clip import cell_tokens, clip_preprocess_cfg, create_clip, visual_features
from models.common.data import normalize_images
from models.common.tokenizer import load_tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = "greedy"  # greedy | beam | nucleus
    max_new_tokens: int = 100
    # EOS is not allowed before this many tokens (0: any time), e.g. so a barely trained
    # captioner cannot write empty captions.
    min_new_tokens: int = 0
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    # > 1: decode this many captions per image (the best beams, or nucleus samples) and
    # keep the one the captioner's concept heads contradict least (a verifier reranking,
    # models.captioning.concepts.most_consistent); needs a captioner with concept heads.
    candidates: int = 1
    # Beam mode: check the caption while it is written against what the concept heads
    # see, pushing a beam below every beam with fewer false claims as soon as the words
    # making one settle (models/captioning/verified_search.py); needs a captioner with
    # concept heads.
    check_clauses: bool = False
    # Beam mode's implementation: "recapflow" (models/captioning/beam_search.py: images
    # leave the batch as their search ends) or "transformers" (`generate`, the check as a
    # logits processor), for an LM whose KV cache cannot be reordered by `reorder_cache`.
    # Both find the same captions.
    beam_search: str = "recapflow"
    # With check_clauses and the recapflow search: rank each step's candidates as if the
    # word each one ends were complete, so a false claim is charged while the beams that
    # avoid it are still candidates (beam_search._look_ahead).
    lookahead: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("greedy", "beam", "nucleus"):
            raise ValueError(f"generation mode {self.mode!r} not in greedy | beam | nucleus")
        if self.candidates < 1 or (self.candidates > 1 and self.mode == "greedy"):
            raise ValueError(
                f"candidates={self.candidates}: need >= 1, and beam or nucleus mode for > 1"
            )
        if self.mode == "beam" and self.candidates > self.num_beams:
            raise ValueError(f"candidates={self.candidates} > num_beams={self.num_beams}")
        if self.beam_search not in ("recapflow", "transformers"):
            raise ValueError(f"beam_search {self.beam_search!r} not in recapflow | transformers")
        if self.check_clauses and self.mode != "beam":
            raise ValueError(
                f"check_clauses reorders beams: it needs mode 'beam', not {self.mode!r}"
            )
        if self.lookahead and not (self.check_clauses and self.beam_search == "recapflow"):
            raise ValueError(
                "lookahead ranks the check's candidates: it needs check_clauses and "
                f"beam_search 'recapflow' (got check_clauses={self.check_clauses}, "
                f"beam_search={self.beam_search!r})"
            )


@dataclass(frozen=True)
class CaptionerSpec:
    """How to rebuild the captioner's modules before loading its weights."""

    clip_model: str
    lm: dict  # {"config": GPT2Config kwargs} (tiny) or {"pretrained": path or hub id}
    prefix: str = "tokens"  # "tokens": pooled + pooled patch grid; "pooled": the embedding alone
    # Patch tokens are average-pooled to a grid x grid map: short prefixes keep the LM fast,
    # and a 3x3 map still says where things are.
    prefix_grid: int = 3
    # A learned embedding per prefix slot, at the scale of the LayerNormed prefix: without
    # it the LM tells the grid tokens apart only by GPT-2's small position embeddings, and
    # it names the wrong cells (docs/log/).
    prefix_positions: bool = True
    # The `concepts` phase's per-cell heads ({head: class names}), kept frozen beside the
    # tower they were trained on: they verify candidate captions (GenerationConfig.
    # candidates). None: no such phase ran (e.g. `full`), or the tower trained after it.
    concept_heads: dict[str, list[str]] | None = None


class PrefixCaptioner(nn.Module):
    def __init__(
        self,
        visual: nn.Module,
        lm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        spec: CaptionerSpec,
        image_cfg: tuple[int, tuple, tuple],
    ):
        super().__init__()
        self.visual, self.lm, self.tokenizer, self.spec = visual, lm, tokenizer, spec
        self.image_size, self.mean, self.std = image_cfg
        hidden = lm.get_input_embeddings().embedding_dim
        if hasattr(self.visual, "output_tokens"):  # open_clip ViTs return their patch tokens
            self.visual.output_tokens = True
        with torch.no_grad():
            pooled, grid = self.image_features(torch.zeros(1, 3, self.image_size, self.image_size))
        self.pooled_proj = nn.Sequential(nn.Linear(pooled.shape[-1], hidden), nn.LayerNorm(hidden))
        self.token_proj = nn.Sequential(nn.Linear(grid.shape[1], hidden), nn.LayerNorm(hidden))
        n_prefix = 1 + (spec.prefix_grid**2 if spec.prefix == "tokens" else 0)
        self.prefix_pos = (
            nn.Parameter(torch.randn(n_prefix, hidden)) if spec.prefix_positions else None
        )
        self.cell_heads: nn.ModuleDict | None = None
        if spec.concept_heads:
            self.cell_heads = nn.ModuleDict(
                {k: nn.Linear(grid.shape[1], len(v)) for k, v in spec.concept_heads.items()}
            ).requires_grad_(False)

    @classmethod
    def build(
        cls,
        spec: CaptionerSpec,
        tokenizer: PreTrainedTokenizerBase,
        clip_pretrained: str | None = None,
    ) -> PrefixCaptioner:
        clip = create_clip(spec.clip_model, clip_pretrained)
        if "pretrained" in spec.lm:
            lm = AutoModelForCausalLM.from_pretrained(spec.lm["pretrained"])
        else:
            cfg = GPT2Config(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # GPT-2's tanh GELU as one fused kernel: "gelu_new" computes the same curve
                # in elementwise ops, which makes a CPU training step slower (docs/log/).
                **{"activation_function": "gelu_pytorch_tanh", **spec.lm["config"]},
            )
            lm = GPT2LMHeadModel(cfg)
        return cls(clip.visual, lm, tokenizer, spec, clip_preprocess_cfg(clip))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,3,H,W) -> prefix embeddings (B, P, hidden)."""
        return self._prefix(*self._features(images))

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_images(
            images.to(self.pooled_proj[0].weight.device), self.image_size, self.mean, self.std
        )
        return self.image_features(x)

    def _prefix(self, pooled: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        parts = [self.pooled_proj(pooled).unsqueeze(1)]
        if self.spec.prefix == "tokens":
            parts.append(self.token_proj(cell_tokens(grid, self.spec.prefix_grid)))
        prefix = torch.cat(parts, dim=1)
        return prefix + self.prefix_pos if self.prefix_pos is not None else prefix

    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (pooled embedding (B, D), last feature map (B, C, h, w))."""
        return visual_features(self.visual, x)

    def _with_bos(self, prefix: torch.Tensor) -> torch.Tensor:
        bos = torch.full((len(prefix), 1), self.tokenizer.bos_token_id, device=prefix.device)
        return torch.cat([prefix, self.lm.get_input_embeddings()(bos)], dim=1)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced loss on caption tokens; input_ids are caption + EOS (no BOS)."""
        prefix = self._with_bos(self.prefix(images))
        emb = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        n_pre = prefix.shape[1]
        mask = torch.cat([attention_mask.new_ones(len(images), n_pre), attention_mask], dim=1)
        logits = self.lm(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        # position n_pre-1 (the BOS) predicts the first caption token, and so on.
        pred = logits[:, n_pre - 1 : -1]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def generate(self, images: torch.Tensor, cfg: GenerationConfig) -> list[str]:
        """Captions for a batch of uint8 images."""
        pooled, grid = self._features(images)  # once: the prefix and the verifier read them
        emb = self._with_bos(self._prefix(pooled, grid))
        n = cfg.candidates
        seen = None
        if n > 1 or cfg.check_clauses:
            if self.cell_heads is None:
                raise ValueError(
                    f"candidates={n}, check_clauses={cfg.check_clauses} verify captions by "
                    "the captioner's concept heads, and this captioner has none (no "
                    "`concepts` phase, or a captioning phase trained the tower after it: "
                    "visual_lr_scale > 0): use candidates=1, check_clauses=false"
                )
            # What the frozen concept heads see in each image judges its captions.
            cells = cell_tokens(grid, CONCEPT_GRID)
            seen = predicted_scenes({k: head(cells) for k, head in self.cell_heads.items()})
        # A caption never contains PAD, BOS or UNK (decoding would drop them silently).
        eos = self.tokenizer.eos_token_id
        suppress = [i for i in self.tokenizer.all_special_ids if i != eos]
        check = ClauseCheck(self.tokenizer, seen, cfg.num_beams) if cfg.check_clauses else None
        if cfg.mode == "beam" and cfg.beam_search == "recapflow":
            out = beam_search(
                self.lm,
                emb,
                num_beams=cfg.num_beams,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=eos,
                suppress_tokens=suppress,
                min_new_tokens=cfg.min_new_tokens,
                num_return_sequences=n,
                check=check,
                lookahead=cfg.lookahead,
            )
        else:
            kwargs = {
                "max_new_tokens": cfg.max_new_tokens,
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": eos,
                "suppress_tokens": suppress,
                "num_return_sequences": n,
            }
            if cfg.min_new_tokens:
                kwargs["min_new_tokens"] = cfg.min_new_tokens
            if cfg.mode == "beam":
                kwargs.update(num_beams=cfg.num_beams, do_sample=False)
            elif cfg.mode == "nucleus":
                torch.manual_seed(cfg.seed)
                kwargs.update(do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature)
            else:
                kwargs.update(do_sample=False, num_beams=1)
            if check is not None:
                kwargs["logits_processor"] = LogitsProcessorList([check])
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
            out = self.lm.generate(inputs_embeds=emb, attention_mask=mask, **kwargs)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        if n == 1:
            return texts
        return most_consistent([texts[i : i + n] for i in range(0, len(texts), n)], seen)

    def save(self, out_dir: Path, extra: dict | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # save_model handles the LM's tied input/output embeddings (shared tensors).
        save_model(self, str(out_dir / "model.safetensors"))
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        meta = {"spec": asdict(self.spec), **(extra or {})}
        (out_dir / "captioner.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> PrefixCaptioner:
        """A captioner saved by `save`: safetensors weights, never a pickle."""
        meta = json.loads((Path(path) / "captioner.json").read_text())
        tok = load_tokenizer(Path(path) / "tokenizer")
        # Captioners saved before prefix position embeddings existed have none.
        spec = CaptionerSpec(**{"prefix_positions": False, **meta["spec"]})
        model = cls.build(spec, tok)
        load_model(model, str(Path(path) / "model.safetensors"))
        return model.eval()
