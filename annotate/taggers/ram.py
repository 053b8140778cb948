"""Tagging with RAM++ (or RAM) from the official checkpoint, without the recognize-anything package.

``checkpoint`` is the official ``ram_plus_swin_large_14m.pth`` (or ``ram_swin_large_14m.pth``)
as downloaded: it is read with ``torch.load(weights_only=True)``, which accepts tensors and plain
containers only. Which model it is comes from its tensors (RAM++ has 51 embeddings per tag). The
image is resized to ``image_size`` squared and ImageNet-normalised, as the reference's
``get_transform`` does; a tag is predicted when its sigmoid score passes its own threshold
(``annotate/data/ram_tag_list_threshold.txt``, the reference's per-class thresholds). Tags come
out in English, best score first.
"""

from __future__ import annotations

import importlib.resources
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt
from torchvision import transforms

from annotate.backends import Tagger
from annotate.engine.records import Record
from annotate.taggers.ram_model import RamModel
from annotate.taggers.vocabulary import load_vocabulary

RAM_THRESHOLDS = "ram_tag_list_threshold.txt"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _local_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"RAM checkpoint {path!r} is not a file")
    return os.path.abspath(path)


class RamTaggerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Annotated[str, AfterValidator(_local_file)]  # the official .pth file
    image_size: PositiveInt = 384  # the official checkpoints' (Swin-L, window 12)
    vocabulary: str = "ram"  # the checkpoint's tags, in its order
    thresholds: str | None = None  # per-tag thresholds file; default: RAM's for vocabulary "ram"
    threshold: float = Field(0.68, gt=0.0, lt=1.0)  # for tags without a per-tag threshold


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official RAM / RAM++ file (its ``"model"`` entry)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors; refusing to unpickle it ({error})"
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "label_embed" not in state:
        raise ValueError(f"{path} is not a RAM / RAM++ checkpoint (no label_embed)")
    return state


def load_thresholds(settings: RamTaggerSettings, count: int) -> torch.Tensor:
    """One threshold per tag: the file's values in order, ``threshold`` past its end."""
    if settings.thresholds is not None:
        text = Path(settings.thresholds).read_text(encoding="utf-8")
    elif settings.vocabulary == "ram":
        text = importlib.resources.files("annotate.data").joinpath(RAM_THRESHOLDS).read_text()
    else:
        text = ""
    values = [float(v) for v in text.split()]
    if len(values) > count:
        raise ValueError(f"{len(values)} thresholds for {count} tags")
    return torch.tensor(values + [settings.threshold] * (count - len(values)))


def select_tags(
    probabilities: torch.Tensor, thresholds: torch.Tensor, tags: Sequence[str]
) -> list[list[str]]:
    """Per row: the tags whose probability exceeds their threshold, highest first."""
    chosen = []
    for row in probabilities:
        passing = (row > thresholds).nonzero()[:, 0]
        order = passing[row[passing].argsort(descending=True, stable=True)]
        chosen.append([tags[i] for i in order.tolist()])
    return chosen


class RamTagger(Tagger):
    Settings = RamTaggerSettings
    packages = ("torch", "timm")

    def __init__(self, settings: RamTaggerSettings, device: str):
        super().__init__(settings, device)
        self.tags = load_vocabulary(settings.vocabulary)
        state = load_checkpoint_state(settings.checkpoint)
        self.model = RamModel.from_checkpoint_state(state, len(self.tags), settings.image_size)
        self.model = self.model.to(device)
        self.thresholds = load_thresholds(settings, len(self.tags))
        self.transform = transforms.Compose(
            [
                transforms.Resize((settings.image_size, settings.image_size)),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @torch.inference_mode()
    def logits(self, images: list) -> torch.Tensor:
        """PIL images -> (B, tags) logits on the CPU."""
        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        return self.model(pixels.to(self.model.fc.weight.dtype)).float().cpu()

    def tag(self, records: Sequence[Record]) -> list[list[str]]:
        if not records:
            return []
        probabilities = torch.sigmoid(self.logits([r.rgb() for r in records]))
        return select_tags(probabilities, self.thresholds, self.tags)
