"""IFAdapter: appearance tokens and ISM layers, attached to a stock diffusers UNet.

The module owns every trainable weight (resampler, box embedding, one ``ISMLayer`` per controlled
cross-attention layer) and nothing of the base model: ``install`` wraps the processor of each
chosen layer of an unmodified ``UNet2DConditionModel`` in an ``IFAdapterAttnProcessor``
(``installed`` does it for one block and then puts the previous processors back), and the
processors read the conditioning that this module activates around a UNet call. The UNet's own
state dict therefore stays the base model's, and a checkpoint holds the adapter alone.

The defaults follow the paper's equations. Five config values instead reproduce the authors'
released inference code, for their weights (``ifadapter.released`` converts ``spd_adapter.bin``
and sets them): ``resampler_variant="released"``, ``qk_norm_dim``, ``fusion_slots``,
``injection="before_to_out"`` and ``dropped_description="empty"``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_module

from ifadapter.attention_processor import (
    IFAdapterAttnProcessor,
    Injection,
    InstanceConditioning,
    ISMLayer,
)
from ifadapter.box_embedding import BoxEmbedding
from ifadapter.resampler import Resampler, Variant
from ifadapter.text import InstanceFeatures

WEIGHTS_NAME = "ifadapter.safetensors"

# Released configuration: the first four transformer blocks of the mid block and of each
# attention of up_blocks.0, i.e. 16 cross-attention layers at the lowest resolution on SDXL.
TOKEN_GROUPS = ("appearance", "eot")  # an instance's tokens: resampled words, its EoT token

DEFAULT_LAYER_PATTERNS = (
    "mid_block.attentions.0.transformer_blocks.[0-3].attn2",
    "up_blocks.0.attentions.*.transformer_blocks.[0-3].attn2",
)


def weights_name(variant: str | None = None) -> str:
    """``ifadapter.safetensors``, or ``ifadapter.fp16.safetensors`` for variant "fp16" (the
    place diffusers gives a variant in a file name)."""
    return WEIGHTS_NAME if variant is None else f"ifadapter.{variant}.safetensors"


def one_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a loader was asked for under diffusers' current name (``dtype``) or its older
    one (``torch_dtype``); both, and different, is a TypeError."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise TypeError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one")
    return dtype or torch_dtype


def cast(model: nn.Module, *args) -> None:
    """``nn.Module.to``: diffusers 0.42's ``ModelMixin.to`` warns on every dtype cast of a model
    that keeps no module in float32 (it reads the empty list as "some")."""
    nn.Module.to(model, *args)


def _module_key(layer: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return layer.replace(".", "__")


class IFAdapter(ModelMixin, ConfigMixin):
    """Instance feature adapter; every size is a config value saved with the checkpoint.

    ``box_position_freqs``: each cell's position inside each box, as Fourier bands projected
    into that instance's ISM query (not in the paper; ``attention_processor`` says why the toy
    world needs it). None, the default, is the paper's ISM.

    Behaviour of the released code (all off by default):

    - ``resampler_variant="released"``: gated feed-forward, a LayerNorm before ``proj_out``, and
      a word mask that shrinks by one word per layer (``resampler.released_key_masks``);
    - ``qk_norm_dim``: RMSNorm of this width on each head of the ISM query and instance keys;
    - ``fusion_slots``: the released fusion (``fusion.fuse_instances_released``), a softmax over
      this many slots with padding; a layout with more instances is an error;
    - ``injection="before_to_out"``: the ISM is added to the attention output before the
      frozen ``to_out`` projection;
    - ``dropped_description="empty"``: a dropped description (the unconditional branch of
      guidance) gives the resampler's output for no words and a zero EoT token, instead of zero
      appearance and EoT tokens. The box embedding stays either way.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        layers: Sequence[str],
        layer_channels: Sequence[int],
        cross_attention_dim: int = 2048,
        text_encoder_layers: Sequence[int] = (-2, -4, -6),
        num_queries: int = 4,
        resampler_width: int = 2560,
        resampler_depth: int = 4,
        resampler_heads: int = 20,
        resampler_dim_head: int = 128,
        resampler_ff_mult: int = 4,
        fourier_freqs: int = 64,
        fourier_temperature: float = 100.0,
        box_embed_hidden: int = 512,
        fusion_reduction: int = 16,
        fusion_kernel: int = 7,
        appearance_tokens: bool = True,
        eot_token: bool = True,
        resampler_variant: Variant = "ip_adapter",
        qk_norm_dim: int | None = None,
        fusion_slots: int | None = None,
        injection: Injection = "after_to_out",
        dropped_description: Literal["zero", "empty"] = "zero",
        box_position_freqs: int | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(layer_channels):
            raise ValueError("layers and layer_channels must have the same length")
        if not layers:
            raise ValueError("an IFAdapter needs at least one cross-attention layer to control")
        if not (appearance_tokens or eot_token):
            raise ValueError("an instance needs appearance tokens, its EoT token, or both")
        self.resampler = (
            Resampler(
                input_dim=cross_attention_dim,
                output_dim=cross_attention_dim,
                width=resampler_width,
                depth=resampler_depth,
                heads=resampler_heads,
                dim_head=resampler_dim_head,
                num_queries=num_queries,
                ff_mult=resampler_ff_mult,
                variant=resampler_variant,
            )
            if appearance_tokens
            else None
        )
        self.box_embedding = BoxEmbedding(
            cross_attention_dim, fourier_freqs, fourier_temperature, box_embed_hidden
        )
        self.ism_layers = nn.ModuleDict(
            {
                _module_key(name): ISMLayer(
                    channels,
                    cross_attention_dim,
                    fusion_reduction,
                    fusion_kernel,
                    qk_norm_dim,
                    fusion_slots,
                    injection,
                    box_position_freqs,
                )
                for name, channels in zip(layers, layer_channels, strict=True)
            }
        )
        self._conditioning: InstanceConditioning | None = None

    # ----------------------------------------------------------------- construction

    @classmethod
    def for_unet(
        cls,
        unet: UNet2DConditionModel,
        layer_patterns: Sequence[str] = DEFAULT_LAYER_PATTERNS,
        **config,
    ) -> IFAdapter:
        """A fresh adapter for the cross-attention layers of ``unet`` that match ``layer_patterns``
        (fnmatch patterns over the names in ``unet.attn_processors``)."""
        layers = _match_layers(unet, layer_patterns)
        channels = [_attention(unet, name).to_q.out_features for name in layers]
        config.setdefault("cross_attention_dim", unet.config.cross_attention_dim)
        return cls(layers=layers, layer_channels=channels, **config)

    @property
    def tokens_per_instance(self) -> int:
        cfg = self.config
        k = len(cfg.text_encoder_layers)
        return k * cfg.num_queries * cfg.appearance_tokens + cfg.eot_token

    def ism_layer(self, name: str) -> ISMLayer:
        return self.ism_layers[_module_key(name)]

    def check_unet(self, unet: UNet2DConditionModel) -> None:
        """Raises unless every layer of this adapter is a cross-attention layer of ``unet`` of the
        width the adapter was built for."""
        processors = unet.attn_processors
        for name, channels in zip(self.config.layers, self.config.layer_channels, strict=True):
            if f"{name}.processor" not in processors:
                raise ValueError(f"the UNet has no attention layer {name!r} for this adapter")
            attention = _attention(unet, name)
            if attention.is_cross_attention is False or attention.to_q.out_features != channels:
                raise ValueError(
                    f"layer {name!r} is not a {channels}-channel cross-attention layer of this UNet"
                )
            if attention.to_out[0].out_features != channels:
                raise ValueError(
                    f"layer {name!r} changes width in to_out; the ISM cannot add to it"
                )
            norm_dim = self.config.qk_norm_dim
            if norm_dim is not None and channels // attention.heads != norm_dim:
                raise ValueError(
                    f"layer {name!r} has {channels // attention.heads}-wide heads; the adapter's "
                    f"query/key norm is {norm_dim} wide"
                )

    def install(self, unet: UNet2DConditionModel) -> None:
        """Wraps the processor of each of the adapter's layers (whatever it is: SDPA, sliced,
        fused, a user's) in the ISM processor; other layers keep theirs. Installing over an
        ``IFAdapterAttnProcessor`` replaces it, keeping the processor it wrapped."""
        self.check_unet(unet)
        processors = unet.attn_processors
        for name in self.config.layers:
            key = f"{name}.processor"
            inner = processors[key]
            if isinstance(inner, IFAdapterAttnProcessor):
                inner = inner.inner
            processors[key] = IFAdapterAttnProcessor(name, self.ism_layer(name), self, inner)
        unet.set_attn_processor(processors)

    @contextlib.contextmanager
    def installed(self, unet: UNet2DConditionModel) -> Iterator[None]:
        """Installed for the block only: the UNet gets its previous processors back after it.

        The pipeline installs per call, so between calls its UNet holds exactly the processors
        the user (or a stock feature: attention slicing, fused QKV, xformers,
        ``set_default_attn_processor``) last set, and the adapter wraps whatever they are."""
        previous = unet.attn_processors
        self.install(unet)
        try:
            yield
        finally:
            unet.set_attn_processor(previous)

    # ----------------------------------------------------------------- conditioning

    def instance_tokens(
        self,
        features: InstanceFeatures,
        keep_local: torch.Tensor | None = None,
        token_groups: Collection[str] = TOKEN_GROUPS,
    ) -> torch.Tensor:
        """Appearance tokens + EoT token + box embedding per instance: (B, N, S, D).

        ``keep_local`` (B,) holds 1 to keep and 0 to drop the descriptions of each layout: 0
        gives the unconditional branch of guidance (and the training dropout), which keeps the
        box embedding (``dropped_description`` says what else). Padding slots stay exactly zero.
        A group of ``TOKEN_GROUPS`` left out of ``token_groups`` is dropped the same way for every
        instance: the inference-time ablation of one token group.
        """
        unknown = set(token_groups) - set(TOKEN_GROUPS)
        if unknown:
            raise ValueError(f"unknown token groups {sorted(unknown)}; known: {TOKEN_GROUPS}")
        features = features.to(self.device, self.dtype)
        mask = features.mask
        words, word_mask = features.words[mask], features.word_mask[mask]  # (M, k, T, D), (M, T)
        count, layers, length, dim = words.shape
        keep = None  # (M, 1, 1)
        if keep_local is not None:
            keep = keep_local.to(self.dtype)[:, None].expand_as(mask)[mask][:, None, None]
        left_out = words.new_zeros(count, 1, 1)
        groups = {g: keep if g in token_groups else left_out for g in TOKEN_GROUPS}
        dropped = self.config.dropped_description
        parts = []
        if self.resampler is not None:
            keep = groups["appearance"]
            if keep is not None and dropped == "empty":  # no word of a dropped description
                word_mask = word_mask & (keep[:, 0] > 0)
            appearance = self.resampler(
                words.reshape(count * layers, length, dim),
                word_mask.repeat_interleave(layers, 0),
            ).reshape(count, -1, dim)
            if keep is not None and dropped == "zero":
                appearance = appearance * keep
            parts.append(appearance)
        if self.config.eot_token:
            keep = groups["eot"]
            eot = features.eot[mask].unsqueeze(1)
            parts.append(eot if keep is None else eot * keep)
        tokens = torch.cat(parts, dim=1)
        tokens = tokens + self.box_embedding(features.boxes[mask].to(tokens.dtype)).unsqueeze(1)
        out = tokens.new_zeros(*mask.shape, tokens.shape[1], dim)
        out[mask] = tokens
        return out

    def conditioning(
        self,
        tokens: torch.Tensor,
        boxes: torch.Tensor,
        mask: torch.Tensor,
        latent_size: tuple[int, int],
    ) -> InstanceConditioning:
        """Projects instance tokens once for every ISM layer: valid for every denoising step."""
        slots = self.config.fusion_slots
        if slots is not None and mask.shape[1] and int(mask.sum(1).max()) > slots:
            raise ValueError(
                f"a layout has {int(mask.sum(1).max())} instances; this adapter's fusion has "
                f"{slots} instance slots (fusion_slots, as the released weights were trained)"
            )
        keys, values = {}, {}
        for name in self.config.layers:
            layer = self.ism_layer(name)
            keys[name], values[name] = layer.to_k_ap(tokens), layer.to_v_ap(tokens)
        return InstanceConditioning(keys, values, boxes.to(tokens.dtype), mask, tuple(latent_size))

    @contextlib.contextmanager
    def activated(self, conditioning: InstanceConditioning | None) -> Iterator[None]:
        """Inside the block, the installed processors apply ``conditioning``."""
        previous = self._conditioning
        self.set_conditioning(conditioning)
        try:
            yield
        finally:
            self.set_conditioning(previous)

    def set_conditioning(self, conditioning: InstanceConditioning | None) -> None:
        """None makes every ISM layer compute exactly the stock attention."""
        self._conditioning = conditioning

    def active_conditioning(self) -> InstanceConditioning | None:
        return self._conditioning

    def forward(
        self,
        unet: UNet2DConditionModel,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        features: InstanceFeatures,
        keep_local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One conditioned UNet call. Training goes through here so that a data-parallel wrapper
        around the adapter sees the forward in which its parameters are used."""
        tokens = self.instance_tokens(features, keep_local)
        conditioning = self.conditioning(tokens, features.boxes, features.mask, sample.shape[-2:])
        with self.activated(conditioning):
            return unet(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            ).sample

    # ----------------------------------------------------------------- checkpoints

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """``config.json`` + ``ifadapter.safetensors`` (``ifadapter.<variant>.safetensors`` with
        a variant, as diffusers names variants, so an fp16 copy can sit beside the full one).

        ``safe_serialization`` is in the signature because a pipeline's ``save_pretrained``
        passes it to every component; the adapter is written as safetensors either way (never a
        pickle), which ``from_pretrained`` reads back all the same."""
        del safe_serialization
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        weights = os.path.join(save_directory, weights_name(variant))
        save_file(state, weights, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        *,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool | None = None,
        disable_mmap: bool = False,
        use_flashpack: bool = False,
        device_map: object = None,
        max_memory: object = None,
        offload_folder: object = None,
        offload_state_dict: bool | None = None,
    ) -> IFAdapter:
        """Loads what ``save_pretrained`` wrote (the same ``variant``), in ``dtype`` (diffusers'
        current name) or ``torch_dtype`` (its older one); any other keyword is a TypeError.

        The keywords after ``*`` are those a pipeline's ``from_pretrained`` passes to every
        diffusers model component. ``device_map`` may name one device (a pipeline passes a
        device, or ``{"": device}`` for a component placed whole); the adapter loads whole, so
        ``low_cpu_mem_usage`` and ``disable_mmap`` change nothing. Splitting it over devices,
        offloading, flashpack or a non-safetensors format would, and are refused rather than
        ignored."""
        if use_safetensors is False or use_flashpack:
            raise ValueError("an IFAdapter checkpoint is a safetensors file")
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]
        device = None
        if device_map is not None:
            try:
                device = torch.device(device_map)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"an IFAdapter loads whole onto one device, got device_map={device_map!r}"
                ) from None
        offload = {
            "max_memory": max_memory,
            "offload_folder": offload_folder,
            "offload_state_dict": offload_state_dict or None,
        }
        given = sorted(k for k, v in offload.items() if v is not None)
        if given:
            raise ValueError(
                f"IFAdapter.from_pretrained does not offload ({', '.join(given)}); "
                "load it, then place it with .to()"
            )
        dtype = one_dtype(dtype, torch_dtype)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        name = weights_name(variant)
        weights = os.path.join(directory, name)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no IFAdapter checkpoint at {directory} (missing {name})")
        adapter = cls.from_config(cls.load_config(directory))
        adapter.load_state_dict(load_file(weights), strict=True)
        if dtype is not None:
            cast(adapter, dtype)
        if device is not None:
            adapter.to(device)
        return adapter.eval()


def checkpoint_with_conditioning(adapter: IFAdapter) -> Callable:
    """Gradient checkpointing that replays the adapter's conditioning.

    The ISM processors read the conditioning the adapter activates around a UNet call; a
    checkpointed block is run again during backward, after that call has returned. This function
    captures the active conditioning at forward time and activates it again for the replay, so
    the recomputed block is the block that ran.
    """

    def checkpoint(module: nn.Module, *args):
        conditioning = adapter.active_conditioning()

        def run(*inputs):
            with adapter.activated(conditioning):
                return module(*inputs)

        return checkpoint_module(run, *args, use_reentrant=False)

    return checkpoint


def _attention(unet: UNet2DConditionModel, name: str) -> nn.Module:
    return unet.get_submodule(name)


def _match_layers(unet: UNet2DConditionModel, patterns: Sequence[str]) -> list[str]:
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    layers = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    crossing = [n for n in layers if _attention(unet, n).is_cross_attention]
    if not crossing:
        raise ValueError(f"no cross-attention layer of the UNet matches {list(patterns)}")
    if len(crossing) != len(layers):
        skipped = sorted(set(layers) - set(crossing))
        raise ValueError(f"layer patterns select self-attention layers: {skipped}")
    return crossing
