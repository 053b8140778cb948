"""Instance descriptions through SDXL's two frozen text encoders.

The adapter reads, for every description, the word tokens of k hidden layers of both encoders
(concatenated per token, 2048-d on SDXL) and the EoT token of the penultimate layer. These
features do not depend on the adapter's weights, so training can cache them once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from ifadapter.layout import LayoutTensors


@dataclass
class InstanceFeatures:
    """Padded per-instance text features and boxes of one batch of layouts.

    ``mask`` is False on padding slots; ``word_mask`` is True on word tokens only (SOT, EoT and
    padding excluded). The token axis is trimmed to the longest description in the batch.
    """

    words: torch.Tensor  # (B, N, k, T, D)
    word_mask: torch.Tensor  # (B, N, T) bool
    eot: torch.Tensor  # (B, N, D)
    boxes: torch.Tensor  # (B, N, 4)
    mask: torch.Tensor  # (B, N) bool

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_instances(self) -> int:
        return self.boxes.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> InstanceFeatures:
        def move(x: torch.Tensor) -> torch.Tensor:
            if dtype is not None and x.is_floating_point():
                return x.to(device, dtype)
            return x.to(device)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def repeat_interleave(self, repeats: int) -> InstanceFeatures:
        """Repeats each layout ``repeats`` times in place, as ``num_images_per_prompt`` does."""
        return replace(
            self,
            **{f.name: getattr(self, f.name).repeat_interleave(repeats, 0) for f in fields(self)},
        )

    @classmethod
    def cat(cls, parts: Sequence[InstanceFeatures]) -> InstanceFeatures:
        """Concatenates along the batch, padding instance and token axes to the largest part."""
        n = max(p.num_instances for p in parts)
        t = max(p.words.shape[3] for p in parts)

        def pad(x: torch.Tensor, dims: dict[int, int]) -> torch.Tensor:
            widths = [0] * (2 * x.ndim)
            for dim, size in dims.items():
                widths[2 * (x.ndim - 1 - dim) + 1] = size - x.shape[dim]
            return torch.nn.functional.pad(x, widths)

        return cls(
            words=torch.cat([pad(p.words, {1: n, 3: t}) for p in parts]),
            word_mask=torch.cat([pad(p.word_mask, {1: n, 2: t}) for p in parts]),
            eot=torch.cat([pad(p.eot, {1: n}) for p in parts]),
            boxes=torch.cat([pad(p.boxes, {1: n}) for p in parts]),
            mask=torch.cat([pad(p.mask, {1: n}) for p in parts]),
        )


@torch.no_grad()
def encode_descriptions(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    captions: Sequence[str],
    layers: Sequence[int],
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """captions (M,) -> words (M, k, T, D), word_mask (M, T), eot (M, D).

    D is the sum of the encoders' hidden sizes; T is trimmed to the longest description.
    The ids are padded to the longest description, not to CLIP's 77 positions: CLIP's text
    encoders attend causally, so a position's states do not depend on what follows it, and the
    features equal those of the 77-position encoding for a fraction of the work (descriptions
    are a few words: a tenth of the positions in the toy world).
    ``device`` is where the token ids go, by default the first encoder's; a pipeline under
    sequential CPU offload passes its execution device, since its encoders' weights sit on
    the meta device between forwards.
    """
    device = device or text_encoders[0].device
    words, eots, word_mask, length = [], [], None, 1
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            list(captions),
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        eot_position = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        words.append(torch.stack([hidden[layer] for layer in layers], dim=1))
        eots.append(hidden[-2][torch.arange(len(captions), device=device), eot_position])
        if word_mask is None:  # both tokenizers share CLIP's BPE: the first one's positions serve
            positions = torch.arange(ids.shape[1], device=device)
            word_mask = (positions > 0) & (positions < eot_position[:, None])
            length = int(eot_position.max()) + 1
    return torch.cat(words, -1)[:, :, :length], word_mask[:, :length], torch.cat(eots, -1)


def encode_instances(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    layouts: LayoutTensors,
    layers: Sequence[int],
    device: torch.device | None = None,
) -> InstanceFeatures:
    """Encodes every instance description of a batch of layouts into padded features, on
    ``device`` (see ``encode_descriptions``)."""
    batch, count = layouts.mask.shape
    captions = [caption for row in layouts.captions for caption in row]
    hidden = sum(encoder.config.hidden_size for encoder in text_encoders)
    device = device or text_encoders[0].device
    dtype = text_encoders[0].dtype
    if captions:
        flat_words, flat_word_mask, flat_eot = encode_descriptions(
            tokenizers, text_encoders, captions, layers, device
        )
    else:
        flat_words = torch.zeros(0, len(layers), 1, hidden, device=device, dtype=dtype)
        flat_word_mask = torch.zeros(0, 1, dtype=torch.bool, device=device)
        flat_eot = torch.zeros(0, hidden, device=device, dtype=dtype)
    mask = layouts.mask.to(device)
    words = flat_words.new_zeros(batch, count, *flat_words.shape[1:])
    word_mask = flat_word_mask.new_zeros(batch, count, flat_word_mask.shape[1])
    eot = flat_eot.new_zeros(batch, count, hidden)
    words[mask], word_mask[mask], eot[mask] = flat_words, flat_word_mask, flat_eot
    return InstanceFeatures(words, word_mask, eot, layouts.boxes.to(device, dtype), mask)
