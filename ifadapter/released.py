"""The authors' released weights (``spd_adapter.bin``) as an ``IFAdapter`` checkpoint.

The released file is a pickled dict of three state dicts: ``text_proj_model`` (the resampler),
``pos_net`` (the box embedding) and ``adapter_modules``, a ``ModuleList`` over *every* attention
processor of the SDXL UNet in ``unet.attn_processors`` order, of which only the controlled
cross-attention layers have weights (their index is the only thing that names their layer).
It is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers, and never unpickled otherwise.

Every architecture size is read from the tensor shapes; the layer names come from the UNet's
processor order. The conversion is exact: renames, the released RMSNorm weights ``w`` (applied
as ``1 + w``) stored as ``1 + w``, the spatial convolution of the fusion scorer with its two
input channels swapped (the released code stacks max before mean) and a zero bias (it has none).
What the tensors cannot say is set to the released inference code's values: ``fusion_slots``
(``max_obj=10`` in its ``infer.py``), hidden states -2, -4, -6 and the behaviour switches
documented in ``ifadapter.adapter``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from ifadapter.adapter import IFAdapter, _module_key

GROUPS = ("text_proj_model", "adapter_modules", "pos_net")
RELEASED_FUSION_SLOTS = 10  # max_obj of the released infer.py (and of its dataset)
RELEASED_BEHAVIOUR = dict(
    resampler_variant="released",
    injection="before_to_out",
    dropped_description="empty",
    text_encoder_layers=(-2, -4, -6),
    fourier_temperature=100.0,
)

State = dict[str, torch.Tensor]


def load_released_state(path: str | os.PathLike) -> dict[str, State]:
    """The three state dicts of ``spd_adapter.bin``, loaded without executing any pickle code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} is not a plain state dict ({error})") from None
    if not isinstance(state, dict) or set(GROUPS) - set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a released IFAdapter checkpoint: needs {GROUPS}, has {found}"
        )
    return {group: dict(state[group]) for group in GROUPS}


def _processor_layers(state: dict[str, State], unet: UNet2DConditionModel) -> dict[int, str]:
    """adapter_modules index -> UNet layer name, for every index that holds weights."""
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    indices = sorted({int(key.split(".", 1)[0]) for key in state["adapter_modules"]})
    if indices and indices[-1] >= len(names):
        raise ValueError(
            f"adapter_modules has processor {indices[-1]} but the UNet has {len(names)} attention "
            "layers: the weights are for another UNet architecture"
        )
    return {index: names[index] for index in indices}


def released_config(
    state: dict[str, State],
    unet: UNet2DConditionModel,
    fusion_slots: int = RELEASED_FUSION_SLOTS,
) -> dict:
    """The ``IFAdapter`` config of released weights for ``unet`` (sizes from the shapes)."""
    text, pos = state["text_proj_model"], state["pos_net"]
    layers = _processor_layers(state, unet)
    first = state["adapter_modules"]
    depth = len({key.split(".")[1] for key in text if key.startswith("layers.")})
    width = text["latents"].shape[-1]
    dim_head = text["layers.0.0.q_norm.weight"].shape[0]
    cross_attention_dim = text["proj_out.weight"].shape[0]
    if text["proj_in.weight"].shape[1] != cross_attention_dim:
        raise ValueError("the resampler's input and output widths differ; IFAdapter needs one")
    index = next(iter(layers))
    channels = [first[f"{i}.to_k_ap.weight"].shape[0] for i in layers]
    for (index, name), layer_width in zip(layers.items(), channels, strict=True):
        attention = unet.get_submodule(name)
        if not attention.is_cross_attention or attention.to_q.out_features != layer_width:
            raise ValueError(
                f"processor {index} holds {layer_width}-channel weights but is {name!r} of this "
                "UNet, not such a cross-attention layer: the weights are for another UNet"
            )
    hidden = first[f"{index}.cbam.cam.linear.0.weight"].shape[0]
    return dict(
        RELEASED_BEHAVIOUR,
        layers=list(layers.values()),
        layer_channels=channels,
        cross_attention_dim=cross_attention_dim,
        num_queries=text["latents"].shape[1],
        resampler_width=width,
        resampler_depth=depth,
        resampler_heads=text["layers.0.0.to_q.weight"].shape[0] // dim_head,
        resampler_dim_head=dim_head,
        resampler_ff_mult=text["layers.0.1.gate_proj.weight"].shape[0] // width,
        fourier_freqs=pos["linears_position.0.weight"].shape[1] // 8,
        box_embed_hidden=pos["linears_position.0.weight"].shape[0],
        fusion_reduction=channels[0] // hidden,
        fusion_kernel=first[f"{index}.cbam.sam.conv.weight"].shape[-1],
        qk_norm_dim=first[f"{index}.q_norm.weight"].shape[0],
        fusion_slots=fusion_slots,
    )


def _gemma(weight: torch.Tensor) -> torch.Tensor:
    """The released RMSNorm scales by ``1 + w``; ``nn.RMSNorm`` scales by its weight."""
    return weight.float() + 1.0


def _max_mean_to_mean_max(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, [1, 0]]


Rule = tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]

RESAMPLER_RULES: list[Rule] = [
    (r"layers\.(\d+)\.0\.norm1\.(.+)", r"layers.\1.0.norm_tokens.\2", None),
    (r"layers\.(\d+)\.0\.norm2\.(.+)", r"layers.\1.0.norm_latents.\2", None),
    (r"layers\.(\d+)\.0\.q_norm\.weight", r"layers.\1.0.norm_q.weight", _gemma),
    (r"layers\.(\d+)\.0\.k_norm\.weight", r"layers.\1.0.norm_k.weight", _gemma),
    (r"layers\.(\d+)\.0\.(to_q|to_kv|to_out)\.weight", r"layers.\1.0.\2.weight", None),
    (r"layers\.(\d+)\.1\.(gate_proj|up_proj|down_proj)\.weight", r"layers.\1.1.\2.weight", None),
    (r"attention_norm\.(.+)", r"norm_pre_out.\1", None),
    (r"(latents|proj_in\..+|proj_out\..+|norm_out\..+)", r"\1", None),
]
POSITION_RULES: list[Rule] = [(r"linears_position\.([024])\.(.+)", r"mlp.\1.\2", None)]
PROCESSOR_RULES: list[Rule] = [
    (r"(to_k_ap|to_v_ap)\.weight", r"\1.weight", None),
    (r"q_norm\.weight", "norm_q.weight", _gemma),
    (r"k_norm\.weight", "norm_k.weight", _gemma),
    (r"cbam\.cam\.linear\.([02])\.(.+)", r"scorer.channel_mlp.\1.\2", None),
    (r"cbam\.sam\.conv\.weight", "scorer.spatial_conv.weight", _max_mean_to_mean_max),
    (r"conv\.(.+)", r"scorer.to_score.\1", None),
    (r"alpha", "gate", None),
]


def _rename(key: str, tensor: torch.Tensor, rules: list[Rule]) -> tuple[str, torch.Tensor] | None:
    for pattern, target, transform in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(target), tensor if transform is None else transform(tensor)
    return None


def _entries(state: dict[str, State], layers: dict[int, str]):
    """(released key, our module prefix, key inside the module, tensor, rules) per tensor."""
    for key, tensor in state["text_proj_model"].items():
        yield f"text_proj_model.{key}", "resampler", key, tensor, RESAMPLER_RULES
    for key, tensor in state["pos_net"].items():
        yield f"pos_net.{key}", "box_embedding", key, tensor, POSITION_RULES
    for key, tensor in state["adapter_modules"].items():
        index, inner = key.split(".", 1)
        prefix = f"ism_layers.{_module_key(layers[int(index)])}"
        yield f"adapter_modules.{key}", prefix, inner, tensor, PROCESSOR_RULES


def convert_released_state(state: dict[str, State], layers: dict[int, str]) -> State:
    """Released state dicts -> the state dict of the ``IFAdapter`` from ``released_config``."""
    out: State = {}
    unknown = []
    for released, prefix, key, tensor, rules in _entries(state, layers):
        renamed = _rename(key, tensor, rules)
        if renamed is None:
            unknown.append(released)
            continue
        name, value = renamed
        out[f"{prefix}.{name}"] = value
        if name == "scorer.spatial_conv.weight":  # the released convolution has no bias
            out[f"{prefix}.scorer.spatial_conv.bias"] = value.new_zeros(1)
    if unknown:
        raise ValueError(f"unknown keys in the released weights: {', '.join(sorted(unknown))}")
    return out


def released_adapter(
    state: dict[str, State],
    unet: UNet2DConditionModel,
    fusion_slots: int = RELEASED_FUSION_SLOTS,
) -> IFAdapter:
    """An ``IFAdapter`` holding the released weights, loaded strictly (every key, every shape).

    ``unet`` only supplies the processor order and layer widths: a UNet on the meta device
    (``UNet2DConditionModel.from_config`` under ``torch.device("meta")``) serves."""
    config = released_config(state, unet, fusion_slots)
    adapter = IFAdapter(**config)
    adapter.load_state_dict(convert_released_state(state, _processor_layers(state, unet)))
    return adapter.eval()
