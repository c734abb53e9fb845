"""A UNet that draws the layout it is given, and the layout model that samples one from
the caption (layout-grounded generation: LMD, Lian et al. 2023; GLIGEN, Li et al. 2023).

Cross-attention and the pooled vector tell every place of the image the same thing, so
a place the caption leaves open gets the average of what could stand there: copies of
the named shape in several cells, one colour for every object. Here the work is split:

- the layout model reads the caption's token states and *samples* one scene, token by
  token: the background, then each of the 3 x 3 cells (empty, or a shape, colour and
  size), then the word and its cell. Sampling, not averaging, is what keeps one diamond
  one diamond when the caption does not say where it stands;
- the UNet gets that layout as a one-hot map per latent place (its cell's shape, colour,
  size and word, and the background), concatenated to the noisy latent, beside the usual
  cross-attention and pooled vector.

The UNet trains on the layouts of its training images (what a detector, or the world's
own annotation, says is there) and the layout model on the captions the UNet sees,
paired with those layouts: what a caption says about where things stand is learnt from
the captions, so the caption ablation still measures the captions.

`LayoutUNet2DConditionModel` is a `UNet2DConditionModel` with the layout model inside, so
`save_pretrained`, the EMA and the exported pipeline carry both. A sampler asks it for a
layout once per image (`plan`) and passes it to every step (`layout=`); the unconditional
branch gets `layout=None` rows (all -1): no layout. This file imports only torch and
diffusers: the diffusers export copies it into the pipeline folder's `unet/`.
"""

import inspect
import math
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn import functional as F

GRID = 3
CELLS = GRID * GRID
SEQ = 1 + CELLS + 1  # background, the cells row-major, the word
KINDS = ("shape", "colour", "size", "word", "background")


def _kind(position: int) -> int:
    """Which vocabulary a sequence position draws from: 0 background, 1 cell, 2 word."""
    return 0 if position == 0 else (1 if position <= CELLS else 2)


class LayoutModel(nn.Module):
    """Caption token states -> a scene's SEQ tokens, one at a time (a transformer decoder
    whose memory is the caption)."""

    def __init__(self, text_width: int, vocab: tuple[int, int, int], width: int, layers: int):
        super().__init__()
        self.vocab = vocab
        self.memory = nn.Linear(text_width, width)
        self.embed = nn.ModuleList(nn.Embedding(v, width) for v in vocab)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, v) for v in vocab)

    def forward(
        self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor
    ) -> list[torch.Tensor]:
        """Logits of each position given the tokens before it (teacher forcing): one
        tensor per position of `tokens` (B, n <= SEQ). `mask` (B, L): the caption's real
        tokens (True) among its padded states (B, L, text_width)."""
        n = tokens.shape[1]
        keep = int(mask.sum(1).max().clamp(min=1))  # the padding after the longest is masked
        states, mask = states[:, :keep], mask[:, :keep].clone()
        mask[:, 0] = True  # an empty caption still has its first state to attend to
        prev = [self.start.expand(len(states), -1)]
        prev += [self.embed[_kind(i)](tokens[:, i]) for i in range(n - 1)]
        x = torch.stack(prev, 1) + self.pos[:n]
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
        memory = self.memory(states.to(x.dtype))
        h = self.decoder(
            x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~mask
        )
        h = self.norm(h)
        return [self.heads[_kind(i)](h[:, i]) for i in range(n)]

    def loss(self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the SEQ positions."""
        logits = self(states, mask, tokens)
        return sum(F.cross_entropy(lg, tokens[:, i]) for i, lg in enumerate(logits)) / SEQ

    @torch.no_grad()
    def sample(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        guidance: float = 1.0,
        empty: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_nothing: bool = True,
    ) -> torch.Tensor:
        """(B, SEQ) tokens drawn one position at a time; `generator` lives on the CPU.
        `guidance` != 1 needs `empty`, the (states, mask) of the unconditional caption
        (the empty one, or a negative prompt), one row per caption or one for all;
        `keep_nothing`: see `guided_logits` (False guides whether a cell is filled too,
        which benchmarks/layout_model.py measures against)."""
        if guidance != 1.0 and empty is None:
            raise ValueError("layout guidance needs the empty caption's states and mask")
        b = len(states)
        if guidance != 1.0:  # both branches in one batch: the caption's rows, then empty's
            e_states, e_mask = (x.expand(b, *x.shape[1:]) for x in empty)
            states, mask = torch.cat([states, e_states]), torch.cat([mask, e_mask])
        tokens = torch.zeros(b, 0, dtype=torch.long, device=states.device)
        for i in range(SEQ):
            pad = F.pad(tokens, (0, 1))
            pad = pad if guidance == 1.0 else pad.repeat(2, 1)
            logits = self(states, mask, pad)[i].float()
            if guidance != 1.0:
                cond, uncond = logits.chunk(2)
                logits = guided_logits(cond, uncond, guidance, keep_nothing and i > 0)
            probs = (logits / temperature).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
            tokens = torch.cat([tokens, nxt], 1)
        return tokens


def guided_logits(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, keep_first: bool
) -> torch.Tensor:
    """Classifier-free guidance of one position's logits (B, V), as for image tokens
    (Make-A-Scene, Parti): uncond + scale * (cond - uncond). With `keep_first` (a cell's
    or the word's position, whose token 0 is "nothing here") token 0 keeps its
    conditional probability and guidance reshapes only what stands: guiding the choice
    between something and nothing too pushes every cell away from the empty caption's
    prior towards "something", adding objects a short caption never asked for and
    breaking the counts a descriptive one gives."""
    guided = uncond + scale * (cond - uncond)
    if not keep_first:
        return guided
    nothing = cond.log_softmax(-1)[:, :1]
    something = torch.log1p(-nothing.exp().clamp(max=1 - 1e-6))
    return torch.cat([nothing, guided[:, 1:].log_softmax(-1) + something], 1)


class LayoutUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel`'s config plus `layout_classes` (the names of each kind:
    shape, colour, size, word, background), `layout_width` and `layout_layers`."""

    def __init__(
        self,
        layout_classes: dict | None = None,
        layout_width: int = 128,
        layout_layers: int = 3,
        **unet_config,
    ):
        if not layout_classes or sorted(layout_classes) != sorted(KINDS):
            raise ValueError(f"layout_classes must name the classes of each of {KINDS}")
        n = {k: len(layout_classes[k]) for k in KINDS}
        channels = (n["shape"] + 1) + n["colour"] + n["size"] + (n["word"] + 1) + n["background"]
        latent_channels = unet_config.pop("in_channels", 4)
        # The parent registers its own arguments, with the layout's channels in in_channels.
        super().__init__(in_channels=latent_channels + channels, **unet_config)
        self.register_to_config(
            in_channels=latent_channels,
            layout_classes={k: list(layout_classes[k]) for k in KINDS},
            layout_width=layout_width,
            layout_layers=layout_layers,
        )
        self.n, self.layout_channels = n, channels
        vocab = (n["background"], 1 + n["shape"] * n["colour"] * n["size"], 1 + n["word"] * CELLS)
        self.layout_model = LayoutModel(
            self.config.cross_attention_dim, vocab, layout_width, layout_layers
        )
        side = self.config.sample_size
        side = side if isinstance(side, int) else side[0]
        edges = [round(i * side / GRID) for i in range(GRID + 1)]
        cell_of = torch.zeros(side, side, dtype=torch.long)
        for r in range(GRID):
            for c in range(GRID):
                cell_of[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = r * GRID + c
        self.register_buffer("cell_of", cell_of.flatten(), persistent=False)

    @staticmethod
    def _get_init_keys(input_class):
        # diffusers' `from_config` passes only the config keys its init names: this one
        # takes the UNet's own through **unet_config.
        keys = set(inspect.signature(input_class.__init__).parameters)
        if issubclass(input_class, LayoutUNet2DConditionModel):
            keys |= set(inspect.signature(UNet2DConditionModel.__init__).parameters)
            keys.discard("unet_config")
        return keys

    # -- scenes and tokens ---------------------------------------------------------------

    def scene_tokens(self, scene: dict) -> list[int]:
        """A scene as the world writes it ({"background", "objects": [{"shape", "color",
        "size", "row", "col"}], "word", "word_cell"}) -> its SEQ tokens."""
        cls, n = self.config.layout_classes, self.n
        cells = [0] * CELLS
        for o in scene["objects"]:
            s, c = cls["shape"].index(o["shape"]), cls["colour"].index(o["color"])
            z = cls["size"].index(o["size"])
            cells[o["row"] * GRID + o["col"]] = 1 + (s * n["colour"] + c) * n["size"] + z
        word = 0
        if scene.get("word"):
            r, c = scene["word_cell"]
            word = 1 + cls["word"].index(scene["word"]) * CELLS + r * GRID + c
        return [cls["background"].index(scene["background"]), *cells, word]

    def tokens_scene(self, tokens: list[int]) -> dict:
        """SEQ tokens -> the scene they lay out, in the world's dict form."""
        cls, n = self.config.layout_classes, self.n
        objects = []
        for i, t in enumerate(tokens[1 : 1 + CELLS]):
            if t:
                sc, z = divmod(t - 1, n["size"])
                s, c = divmod(sc, n["colour"])
                objects.append(
                    {
                        "shape": cls["shape"][s],
                        "color": cls["colour"][c],
                        "size": cls["size"][z],
                        "row": i // GRID,
                        "col": i % GRID,
                    }
                )
        w = tokens[-1]
        word, cell = divmod(w - 1, CELLS) if w else (None, None)
        return {
            "background": cls["background"][tokens[0]],
            "objects": objects,
            "word": None if w == 0 else cls["word"][word],
            "word_cell": None if w == 0 else [cell // GRID, cell % GRID],
        }

    # -- the map -------------------------------------------------------------------------

    def layout_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, SEQ) tokens -> (B, layout_channels, side, side) one-hot map; a row of -1
        (no layout: the unconditional branch, a dropped caption) is all zeros."""
        n, dev = self.n, tokens.device
        kept = (tokens[:, 0] >= 0).float()
        t = tokens.clamp(min=0)
        obj = t[:, 1 : 1 + CELLS]  # (B, 9)
        present = (obj > 0).float()[..., None]
        sc, z = torch.div(obj - 1, n["size"], rounding_mode="floor"), (obj - 1) % n["size"]
        s, c = torch.div(sc, n["colour"], rounding_mode="floor"), sc % n["colour"]
        shape = F.one_hot(torch.where(obj > 0, s + 1, 0), n["shape"] + 1)
        colour = F.one_hot(c.clamp(min=0), n["colour"]) * present
        size = F.one_hot(z.clamp(min=0), n["size"]) * present
        w = t[:, -1]
        word_cell = F.one_hot(((w - 1) % CELLS).clamp(min=0), CELLS) * (w > 0)[:, None]
        word_id = torch.div(w - 1, CELLS, rounding_mode="floor") + 1
        word = F.one_hot(word_cell * word_id[:, None], n["word"] + 1)
        background = F.one_hot(t[:, 0], n["background"])[:, None].expand(-1, CELLS, -1)
        per_cell = torch.cat([shape, colour, size, word, background], -1).float()
        per_cell = per_cell * kept[:, None, None]
        side = math.isqrt(len(self.cell_of))
        out = per_cell[:, self.cell_of.to(dev)].transpose(1, 2)
        return out.reshape(len(tokens), self.layout_channels, side, side)

    @torch.no_grad()
    def plan(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        guidance: float = 1.0,
        empty: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, SEQ) layout tokens sampled for captions' token states (B, L, D), `mask`
        (B, L) marking their real tokens; `guidance` against `empty` (the unconditional
        caption's states and mask): `LayoutModel.sample`."""
        return self.layout_model.sample(states, mask, generator, temperature, guidance, empty)

    def forward(self, sample, timestep, encoder_hidden_states, *args, layout=None, **kwargs):
        if layout is None:
            layout = torch.full((len(sample), SEQ), -1, dtype=torch.long, device=sample.device)
        inputs = torch.cat([sample, self.layout_map(layout).to(sample.dtype)], 1)
        return super().forward(inputs, timestep, encoder_hidden_states, *args, **kwargs)


def train_layout_model(
    model: LayoutModel,
    states: torch.Tensor,
    masks: torch.Tensor,
    variants: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Trains the layout model alone: `states` (caption variants, rows, L, D) and `masks`
    (variants, rows, L); `variants` (epochs, rows) names the variant a row's caption is in
    each epoch (the sampler's blend: what the UNet sees); `tokens` (rows, SEQ) the rows'
    layouts. AdamW with 100 warmup steps and cosine decay; `progress(step, loss)` every
    200 steps. Returns the last step's loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = min(100, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        rows = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
        epoch = torch.randint(0, len(variants), (), generator=g)
        v = variants[epoch][rows]
        loss = model.loss(states[v, rows].float(), masks[v, rows], tokens[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if progress and (step % 200 == 0 or step == steps):
            progress(step, loss.item())
    return float(loss.item())
