"""The rich-feedback model, RAHF style: image + prompt -> two heatmaps, four scores and
the prompt's misaligned words, in one small multimodal transformer.

RAHF (Liang et al. 2024) encodes ViT patch tokens and T5 text tokens jointly, predicts
heatmaps with a convolutional head and scores with an MLP, and decodes the misaligned
keywords with T5's decoder. Here, small enough to train on a CPU: the reference CLIP's
image tokens (one per patch) and text token states, projected to one width, with a type
embedding each, through a joint transformer encoder; heatmaps from the image tokens by
transposed convolutions back to the image size (sigmoid); scores from the pooled tokens
(sigmoid); keywords by tagging each text token (a word is misaligned when its tokens'
mean probability is above 0.5), which RichHF-18K's per-token labels also allow. Losses:
MSE for heatmaps and scores (RAHF's), binary cross-entropy for the tags.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from models.common.clip import visual_features

SCORES = ("plausibility", "alignment", "composition", "overall")
HEATMAPS = ("implausibility", "misalignment")


def prompt_words(text: str) -> list[str]:
    """The prompt's words as keywords name them: lower case, without punctuation."""
    return [w for w in re.sub(r"[^a-z0-9 ]", " ", text.lower()).split() if w]


def word_tokens(tokenizer, text: str, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (context,) built word by word (start, words, end, padding) and the word
    index of each token (-1 for start, end and padding): the tags' alignment to words."""
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    ids, owner = [sot], [-1]
    for i, word in enumerate(prompt_words(text)):
        pieces = tokenizer.encode(word)
        ids += pieces
        owner += [i] * len(pieces)
    ids, owner = [*ids[: context - 1], eot], [*owner[: context - 1], -1]
    pad = context - len(ids)
    return torch.tensor(ids + [0] * pad), torch.tensor(owner + [-1] * pad)


class RichFeedbackNet(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        width: int = 96,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.clip = clip
        self.clip.visual.output_tokens = True
        size = clip.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        vis_width = clip.visual.transformer.width
        txt_width = clip.transformer.width
        self.img_proj = nn.Linear(vis_width, width)
        self.txt_proj = nn.Linear(txt_width, width)
        self.type_emb = nn.Parameter(torch.zeros(2, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True)
        self.joint = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        grid = self.image_size // clip.visual.patch_size[0]
        ups = []
        while grid < self.image_size:
            ups += [nn.ConvTranspose2d(width, width, 2, stride=2), nn.GELU()]
            grid *= 2
        self.heat = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), *ups,
                                  nn.Conv2d(width, len(HEATMAPS), 1))  # fmt: skip
        self.scores = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, len(SCORES))
        )
        self.tags = nn.Linear(width, 1)

    def text_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token states of the CLIP text tower (its encode_text before pooling)."""
        c, n = self.clip, ids.shape[1]  # prompts may be cut shorter than its context
        x = c.token_embedding(ids) + c.positional_embedding[:n]
        return c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:n, :n]))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: normalised (B, 3, S, S); ids: (B, L). -> heatmaps (B, 2, S, S) in [0, 1],
        scores (B, 4) in [0, 1], tag logits (B, L)."""
        _, grid = visual_features(self.clip.visual, images)  # (B, C, h, w)
        b, _, h, w = grid.shape
        img = self.img_proj(grid.flatten(2).transpose(1, 2)) + self.type_emb[0]
        txt = self.txt_proj(self.text_states(ids)) + self.type_emb[1]
        pad = ids == 0
        mask = torch.cat([torch.zeros(b, h * w, dtype=torch.bool, device=ids.device), pad], 1)
        joint = self.joint(torch.cat([img, txt], 1), src_key_padding_mask=mask)
        img_out, txt_out = joint[:, : h * w], joint[:, h * w :]
        heat = self.heat(img_out.transpose(1, 2).reshape(b, -1, h, w))
        keep = (~mask).float().unsqueeze(-1)
        pooled = (joint * keep).sum(1) / keep.sum(1)
        return {
            "heatmaps": torch.sigmoid(heat),
            "scores": torch.sigmoid(self.scores(pooled)),
            "tags": self.tags(txt_out).squeeze(-1),
        }


def rich_loss(out: dict, batch: dict) -> dict[str, torch.Tensor]:
    """RAHF's losses: MSE on heatmaps and scores; BCE on the word tags (word tokens only)."""
    heat = torch.nn.functional.mse_loss(out["heatmaps"], batch["heatmaps"])
    scores = torch.nn.functional.mse_loss(out["scores"], batch["scores"])
    on_word = batch["owner"] >= 0
    tags = torch.nn.functional.binary_cross_entropy_with_logits(
        out["tags"][on_word], batch["tags"][on_word]
    )
    return {"heatmaps": heat, "scores": scores, "tags": tags, "total": heat + scores + tags}


def predicted_keywords(tag_logits: torch.Tensor, owner: torch.Tensor, words: list[str]) -> set[str]:
    """The words whose tokens' mean probability of being misaligned is above 0.5."""
    p = torch.sigmoid(tag_logits).detach().cpu().numpy()
    owner = owner.cpu().numpy()
    return {
        words[i] for i in range(len(words)) if (owner == i).any() and p[owner == i].mean() > 0.5
    }


def token_tags(owner: torch.Tensor, words: list[str], keywords: set[str]) -> torch.Tensor:
    """1.0 on the tokens of keyword words, 0 elsewhere."""
    flags = np.array([w in keywords for w in words] + [False])  # owner -1 reads the last
    return torch.from_numpy(flags[owner.numpy()].astype(np.float32))
