"""The Instance Semantic Map (ISM) attention processor for a stock diffusers ``Attention``.

A chosen cross-attention layer computes its usual output from the global caption, and then, for
every instance at once (batched SDPA, no loop over instances):

- ``s_i = Attention(Q, K_i, V_i)`` restricted to the cells of box i (paper Eq. 4-5), with Q from
  the frozen ``to_q`` and K_i, V_i from the instance's tokens through ``to_k_ap`` / ``to_v_ap``;
- gated semantic fusion (Eq. 6-7): ``D = sum_i w_i * sigmoid(|union| / |box_i|) * s_i`` with
  ``w_i`` a softmax of a learned score over the instances covering each cell only;
- injection (Eq. 8): ``out = Attention(Q, K, V) + tanh(lambda) * (1 - M_bg) * D`` with lambda
  initialised to 0, so an untrained adapter leaves the base model's output exactly unchanged.

The processor wraps the one it replaced (``inner``): with no conditioning set (base
generation, or past ``control_ratio``) it is that processor, call for call. With conditioning,
over diffusers' ``AttnProcessor2_0`` it computes the attention itself and shares the query with the
ISM; over any other processor (sliced attention, ``AttnProcessor``, fused QKV, xformers,
IP-Adapter, a user's own) it lets the inner processor compute the layer's output and adds the ISM
to it, from the query of the layer's own ``to_q``. So every stock attention implementation keeps
the adapter, and none is re-implemented here.

One setting goes beyond the paper, off by default: ``box_position_freqs`` adds to instance i's
query a learned, zero-initialised projection of where the cell lies inside box i (Fourier bands
of its coordinates in the box's frame). The paper's query says what a cell holds but not where
in the box it sits, so a small base fills a box with its instance's colour whatever the shape;
on the toy base this term took shape from 55 to 67% (docs/toy-world.md).

Three settings of an ``ISMLayer`` reproduce the authors' released code for their weights: an
RMSNorm on each head of the ISM query and of the instance keys (``qk_norm_dim``), the released
fusion over a fixed number of padded slots (``fusion_slots``, see ``fusion.py``), and the
injection before the frozen ``to_out`` projection instead of after it (``before_to_out``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ifadapter.box_embedding import FourierEmbedder
from ifadapter.fusion import FusionScorer, fuse_instances, fuse_instances_released

Injection = Literal["after_to_out", "before_to_out"]
AttentionProcessor = Callable[..., torch.Tensor]  # any of diffusers' processors, or a user's


class ISMLayer(nn.Module):
    """Trainable parameters the adapter adds to one cross-attention layer, and how it uses them
    (the defaults follow the paper; the others reproduce the released code)."""

    def __init__(
        self,
        channels: int,
        token_dim: int,
        fusion_reduction: int,
        fusion_kernel: int,
        qk_norm_dim: int | None = None,
        fusion_slots: int | None = None,
        injection: Injection = "after_to_out",
        box_position_freqs: int | None = None,
    ) -> None:
        super().__init__()
        self.to_k_ap = nn.Linear(token_dim, channels, bias=False)
        self.to_v_ap = nn.Linear(token_dim, channels, bias=False)
        if box_position_freqs is None:
            self.to_q_pos = None
        else:
            # Zero at the start: the query is the layer's own until training moves it.
            self.to_q_pos = nn.Linear(4 * box_position_freqs, channels, bias=False)
            nn.init.zeros_(self.to_q_pos.weight)
            self.position_fourier = FourierEmbedder.octaves(box_position_freqs)
        self.scorer = FusionScorer(channels, fusion_reduction, fusion_kernel)
        self.gate = nn.Parameter(torch.zeros(()))
        if qk_norm_dim is None:
            self.norm_q = self.norm_k = None
        else:
            self.norm_q = nn.RMSNorm(qk_norm_dim, eps=1e-6)
            self.norm_k = nn.RMSNorm(qk_norm_dim, eps=1e-6)
        self.fusion_slots = fusion_slots
        self.before_to_out = injection == "before_to_out"


@dataclass
class LayerGrid:
    """Box masks of one conditioning at one attention resolution."""

    height: int
    width: int
    masks: torch.Tensor  # (B, N, h*w) bool: cells touched by each box, False on padding slots
    area_weight: torch.Tensor  # (B, N) sigmoid(|union| / |box|)
    foreground: torch.Tensor  # (B, h*w) bool: 1 - M_bg
    boxes: torch.Tensor  # (B, N, 4)
    _position_features: dict[tuple[float, ...], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    def position_features(self, fourier: FourierEmbedder) -> torch.Tensor:
        """(B, N, h*w, 4F): ``fourier`` of each cell's centre in box i's frame.

        They depend on the boxes and the bands only, so every layer of this resolution and
        every denoising step of a generation reuses the first computation for its bands;
        adapters without the position term never compute them. Float32 whatever the boxes'
        dtype (``FourierEmbedder`` says why).
        """
        if fourier.bands not in self._position_features:
            positions = box_positions(self.boxes.float(), self.height, self.width)
            self._position_features[fourier.bands] = fourier(positions)
        return self._position_features[fourier.bands]


@dataclass
class InstanceConditioning:
    """Everything the ISM layers need for one UNet batch, computed once per generation.

    ``keys`` / ``values`` are the projected instance tokens per layer name: they do not depend on
    the timestep, so a generation projects them once instead of at every denoising step.
    """

    keys: dict[str, torch.Tensor]  # layer -> (B, N, S, C)
    values: dict[str, torch.Tensor]
    boxes: torch.Tensor  # (B, N, 4)
    mask: torch.Tensor  # (B, N) bool, False on padding
    latent_size: tuple[int, int]
    _grids: dict[int, LayerGrid] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    def grid(self, sequence_length: int) -> LayerGrid:
        if sequence_length not in self._grids:
            height, width = _grid_size(self.latent_size, sequence_length)
            self._grids[sequence_length] = _layer_grid(self.boxes, self.mask, height, width)
        return self._grids[sequence_length]


def _grid_size(latent_size: tuple[int, int], sequence_length: int) -> tuple[int, int]:
    """The (h, w) of a UNet level: each downsample halves the size, rounding up."""
    height, width = latent_size
    while height * width > sequence_length:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != sequence_length:
        raise ValueError(
            f"attention over {sequence_length} tokens matches no UNet level of a "
            f"{latent_size[0]}x{latent_size[1]} latent"
        )
    return height, width


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(…, 4) normalised boxes -> (…, h*w) bool of every cell the box overlaps.

    Cells are taken when the box overlaps them at all (floor of the start, ceil of the end), so
    even a box smaller than one cell of the coarsest level keeps at least one cell.
    """
    x0 = torch.floor(boxes[..., 0:1] * width)
    x1 = torch.ceil(boxes[..., 2:3] * width)
    y0 = torch.floor(boxes[..., 1:2] * height)
    y1 = torch.ceil(boxes[..., 3:4] * height)
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    inside_x = (cols >= x0) & (cols < x1)  # (…, w)
    inside_y = (rows >= y0) & (rows < y1)  # (…, h)
    return (inside_y.unsqueeze(-1) & inside_x.unsqueeze(-2)).flatten(-2)


def _layer_grid(boxes: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> LayerGrid:
    masks = box_masks(boxes, height, width) & mask.unsqueeze(-1)
    foreground = masks.any(dim=1)
    union = foreground.sum(-1, keepdim=True).to(boxes.dtype)
    area = masks.sum(-1).to(boxes.dtype).clamp(min=1)
    ratio = torch.where(mask, union / area, torch.zeros_like(area))  # 0 on padding slots
    return LayerGrid(height, width, masks, torch.sigmoid(ratio), foreground, boxes)


def box_positions(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) normalised boxes -> (B, N, h*w, 2): the (x, y) of every cell's centre in each
    box's own frame, where the box spans [0, 1]. Cells outside it fall outside [0, 1], clamped
    to [-1, 2]: their maps are masked anyway, and a padding slot's empty box stays finite."""
    cols = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) / width
    rows = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) / height
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    x = (cols - boxes[..., 0:1]) / size[..., 0:1]  # (B, N, w)
    y = (rows - boxes[..., 1:2]) / size[..., 1:2]  # (B, N, h)
    grid_x = x.unsqueeze(-2).expand(*x.shape[:-1], height, width)
    grid_y = y.unsqueeze(-1).expand(*y.shape[:-1], height, width)
    return torch.stack([grid_x, grid_y], dim=-1).flatten(-3, -2).clamp(-1.0, 2.0)


class IFAdapterAttnProcessor:
    """The processor of a layer the adapter controls, around the processor it replaced.

    It holds no weights of its own: ``layer`` belongs to the ``IFAdapter`` module (so the UNet's
    state dict stays the base model's), and ``source`` is asked for the active conditioning.
    """

    def __init__(
        self,
        name: str,
        layer: ISMLayer,
        source: ConditioningSource,
        inner: AttentionProcessor | None = None,
    ) -> None:
        self.name = name
        self.layer = layer
        self.source = source
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Attention.forward passes a processor only the keyword arguments its signature names,
        # and not every processor names temb (SlicedAttnProcessor does not): the inner one gets
        # what it would have got without the adapter. IP-Adapter's masks are named here so
        # that they reach an inner IP-Adapter processor.
        extra = {"temb": temb, "ip_adapter_masks": ip_adapter_masks}
        extra = {k: v for k, v in extra.items() if v is not None}
        conditioning = self.source.active_conditioning()
        if conditioning is not None and type(self.inner) is AttnProcessor2_0:
            return self._sdpa_with_ism(
                conditioning, attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        out = self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **extra,
        )
        if conditioning is None:
            return out
        return out + self._ism_after_inner(conditioning, attn, hidden_states, temb, out.shape)

    def _ism_after_inner(
        self,
        conditioning: InstanceConditioning,
        attn: Attention,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None,
        out_shape: torch.Size,
    ) -> torch.Tensor:
        """The ISM term to add to another processor's output: the query is recomputed from the
        layer's ``to_q`` (one extra projection), and an injection before ``to_out`` goes through
        the linear part of ``to_out``, since the inner processor has already applied it."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        batch_size, _, inner_dim = query.shape
        query = query.view(batch_size, -1, attn.heads, inner_dim // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        ism = self.instance_semantic_map(conditioning, query, attn.heads)
        if self.layer.before_to_out:
            project = attn.to_out[0]
            ism = project(ism) - project(torch.zeros_like(ism[:, :1]))
        if len(out_shape) == 4:
            ism = ism.transpose(-1, -2).reshape(out_shape)
        return ism / attn.rescale_output_factor

    def _sdpa_with_ism(
        self,
        conditioning: InstanceConditioning,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """``AttnProcessor2_0``'s computation, with its query shared by the ISM."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        ism = self.instance_semantic_map(conditioning, query, attn.heads)
        if self.layer.before_to_out:
            out = out + ism
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if not self.layer.before_to_out:
            out = out + ism

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def instance_semantic_map(
        self, conditioning: InstanceConditioning, query: torch.Tensor, heads: int
    ) -> torch.Tensor:
        """query (B, heads, HW, d) -> gated residual ``tanh(lambda) (1 - M_bg) D``, (B, HW, C)."""
        batch, _, cells, head_dim = query.shape
        if conditioning.batch_size != batch:
            raise ValueError(
                f"instance conditioning holds {conditioning.batch_size} layouts but the UNet batch "
                f"has {batch} samples"
            )
        keys = conditioning.keys[self.name].to(query.dtype)
        instances, tokens = keys.shape[1], keys.shape[2]
        if instances == 0:
            return query.new_zeros(batch, cells, heads * head_dim)
        grid = conditioning.grid(cells)
        layer = self.layer

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, instances, tokens, heads, head_dim).transpose(2, 3)

        keys = split_heads(keys)
        if layer.norm_q is not None:
            query, keys = layer.norm_q(query), layer.norm_k(keys)
        query = query.unsqueeze(1).expand(-1, instances, -1, -1, -1)
        if layer.to_q_pos is not None:
            query = query + self._box_position_query(grid, heads, head_dim).to(query.dtype)
        per_instance = F.scaled_dot_product_attention(
            query,
            keys,
            split_heads(conditioning.values[self.name].to(query.dtype)),
        )  # (B, N, heads, HW, d)
        per_instance = per_instance.transpose(2, 3).reshape(
            batch, instances, cells, heads * head_dim
        )
        if layer.fusion_slots is None:
            fused = fuse_instances(
                per_instance, grid.masks, grid.area_weight, layer.scorer, grid.height, grid.width
            )
        else:
            fused = fuse_instances_released(
                per_instance,
                grid.masks,
                conditioning.mask,
                grid.area_weight,
                layer.scorer,
                grid.height,
                grid.width,
                layer.fusion_slots,
            )
        gate = torch.tanh(self.layer.gate).to(fused.dtype)
        return gate * grid.foreground.unsqueeze(-1).to(fused.dtype) * fused

    def _box_position_query(self, grid: LayerGrid, heads: int, head_dim: int) -> torch.Tensor:
        """(B, N, heads, HW, d): where each cell lies in box i, as a term of instance i's query.

        The layer's query says what a cell holds, not where it sits in the box, and a box's
        tokens cannot tell one of its cells from another: without this, an instance's map is
        the same everywhere in its box, and the box fills with its colour whatever its shape.
        """
        layer = self.layer
        features = grid.position_features(layer.position_fourier)
        position = layer.to_q_pos(features.to(layer.to_q_pos.weight.dtype))
        batch, instances, cells, _ = position.shape
        return position.view(batch, instances, cells, heads, head_dim).transpose(2, 3)


class ConditioningSource(Protocol):
    """What a processor asks for the conditioning of the current UNet call (or None)."""

    def active_conditioning(self) -> InstanceConditioning | None: ...
