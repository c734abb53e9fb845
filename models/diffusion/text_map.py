"""A UNet that is also given the caption as a map: what the caption says about each place.

The stock UNet reads the caption through cross-attention, whose queries are image
features: at high noise they carry almost nothing about where they are, so a place
cannot ask "which object did the caption put here?", and through the pooled vector,
which is the same everywhere. Here one attention layer whose queries are the latent
grid's positions (fixed 2D sine features through a learnt MLP, so that neighbours start
alike) reads the caption's token states, and its output, `text_map_channels` per
position, is concatenated to the noisy latent. Each place then gets, from the first
step on and at every noise level, the attributes the caption gives it, and the UNet's
convolutions, the same at every place, learn to draw a shape once for all places.

It is a `UNet2DConditionModel` with two more config entries, so everything that drives
a UNet (training, sampling, EMA, `save_pretrained`, the exported pipeline) drives this
one; `config.in_channels` stays the latent's. This file imports only torch and
diffusers: the diffusers export copies it into the pipeline folder's `unet/`.
"""

import inspect
import json
import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel


def sine_positions(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) fixed 2D sine/cosine features of a side x side grid, row-major."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter) / max(quarter - 1, 1))
    coords = (torch.arange(side) + 0.5) / side
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (ys.flatten(), xs.flatten()):
        angle = 2 * math.pi * c[:, None] * freqs[None] * side / 2
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1)


def coordinate_features(side: int, channels: int) -> torch.Tensor:
    """(channels, side, side) sin and cos of pi k y and pi k x for k = 1 .. channels / 4:
    the lowest frequencies, so that the first tells the halves apart and the third the
    thirds of a 3 x 3 layout."""
    if channels % 4:
        raise ValueError(f"position_channels must be a multiple of 4, not {channels}")
    coords = (torch.arange(side) + 0.5) / side
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for k in range(1, channels // 4 + 1):
        for c in (ys, xs):
            parts += [(math.pi * k * c).sin(), (math.pi * k * c).cos()]
    return torch.stack(parts)


# How a place asks its question: "mlp", its sine features through a learnt MLP, or
# "sine", the sine features themselves times a learnt scale (no MLP), so that the places'
# queries differ from the first step: from some initialisations the MLP's never came
# apart enough for the map to learn where a caption puts its objects (docs/log/).
QUERIES = ("mlp", "sine")
SINE_QUERY_SCALE = 3.0


class TextMap(torch.nn.Module):
    """Token states (B, L, text_dim) -> a (B, channels, side, side) map."""

    def __init__(
        self,
        side: int,
        text_dim: int,
        channels: int,
        width: int = 64,
        heads: int = 4,
        queries: str = "mlp",
    ):
        super().__init__()
        if queries not in QUERIES:
            raise ValueError(f"unknown text map queries {queries!r}; expected one of {QUERIES}")
        self.side, self.channels, self.kind = side, channels, queries
        self.register_buffer("positions", sine_positions(side, width), persistent=False)
        if queries == "mlp":
            self.query = torch.nn.Sequential(
                torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width)
            )
        else:
            self.query_scale = torch.nn.Parameter(torch.tensor(SINE_QUERY_SCALE))
        self.attn = torch.nn.MultiheadAttention(
            width, heads, kdim=text_dim, vdim=text_dim, batch_first=True
        )
        self.out = torch.nn.Linear(width, channels)

    def queries(self, dtype: torch.dtype) -> torch.Tensor:
        """(side * side, width): what each place asks of the caption."""
        positions = self.positions.to(dtype)
        if self.kind == "sine":
            return positions * self.query_scale.to(dtype)
        return self.query(positions)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        q = self.queries(states.dtype).expand(len(states), -1, -1)
        read, _ = self.attn(q, states, states, need_weights=False)
        return self.out(read).transpose(1, 2).reshape(len(states), -1, self.side, self.side)


class TextMapUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel`'s config plus `text_map_channels`, `text_map_width`,
    `text_map_queries`, `text_map_draws`, `position_channels` and `text_binder_layers`."""

    def __init__(
        self,
        text_map_channels: int = 16,
        text_map_width: int = 64,
        text_map_queries: str = "mlp",
        text_map_draws: bool = False,
        position_channels: int = 0,
        text_binder_layers: int = 0,
        **unet_config,
    ):
        latent_channels = unet_config.pop("in_channels", 4)
        # The parent registers its own arguments, with the map's channels in in_channels.
        extra = text_map_channels + position_channels
        super().__init__(in_channels=latent_channels + extra, **unet_config)
        self.register_to_config(
            in_channels=latent_channels,
            text_map_channels=text_map_channels,
            text_map_width=text_map_width,
            text_map_queries=text_map_queries,
            text_map_draws=text_map_draws,
            position_channels=position_channels,
            text_binder_layers=text_binder_layers,
        )
        side = self.config.sample_size
        side = side if isinstance(side, int) else side[0]
        # Where each place is, as fixed features the convolutions and the cross-attention's
        # queries can read from the first step; without them a place learns where it is
        # only from the zero padding at the borders.
        where = coordinate_features(side, position_channels) if position_channels else None
        self.register_buffer("position_features", where, persistent=False)
        # A causal text tower's shape word cannot see the place its phrase gives after
        # it, and the place's words carry the shape only weakly: a place that asks for
        # its object then gets the other object's as often as its own. Bidirectional
        # layers, trained with the UNet, let each token gather its phrase; the map and
        # the cross-attention read their output.
        dim = self.config.cross_attention_dim
        self.text_binder = (
            torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(
                    dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
                ),
                text_binder_layers,
                enable_nested_tensor=False,
            )
            if text_binder_layers
            else None
        )
        self.text_map = TextMap(
            side,
            self.config.cross_attention_dim,
            text_map_channels,
            text_map_width,
            queries=text_map_queries,
        )
        # The map's own drawing of the output (a 1x1 convolution), to which the UNet's
        # output is added: a model that predicts the clean latent starts from where the
        # caption puts its objects, and the UNet learns what the map cannot draw.
        if text_map_draws:
            self.map_draw = torch.nn.Conv2d(text_map_channels, self.config.out_channels, 1)

    @staticmethod
    def _get_init_keys(input_class):
        # diffusers' `from_config` passes only the config keys its init names: this one
        # takes the UNet's own through **unet_config.
        keys = set(inspect.signature(input_class.__init__).parameters)
        if issubclass(input_class, TextMapUNet2DConditionModel):
            keys |= set(inspect.signature(UNet2DConditionModel.__init__).parameters)
            keys.discard("unet_config")
        return keys

    def bound_states(self, states: torch.Tensor) -> torch.Tensor:
        """The token states the map and the cross-attention read: the text tower's,
        through the binder where there is one."""
        return states if self.text_binder is None else self.text_binder(states)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        encoder_hidden_states = self.bound_states(encoder_hidden_states.to(sample.dtype))
        where = self.text_map(encoder_hidden_states)
        parts = [sample, where]
        if self.position_features is not None:
            parts.append(self.position_features.to(sample.dtype).expand(len(sample), -1, -1, -1))
        inputs = torch.cat(parts, 1)
        out = super().forward(inputs, timestep, encoder_hidden_states, *args, **kwargs)
        if not self.config.text_map_draws:
            return out
        drawn = self.map_draw(where)
        if isinstance(out, tuple):
            return (out[0] + drawn, *out[1:])
        out.sample = out.sample + drawn
        return out


def load_unet(folder) -> UNet2DConditionModel:
    """The UNet saved in `folder` (a `save_pretrained` folder), with or without a map."""
    config = json.loads((Path(folder) / "config.json").read_text())
    mapped = config.get("_class_name") == TextMapUNet2DConditionModel.__name__
    return (TextMapUNet2DConditionModel if mapped else UNet2DConditionModel).from_pretrained(folder)
