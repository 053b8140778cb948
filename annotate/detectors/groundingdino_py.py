"""Grounding-DINO through the original code (PyPI ``groundingdino-py``) for the original ``.pth``.

``groundingdino-py`` 0.4.0 needs transformers < 5, so it cannot share the main environment: it
lives in its own (``scripts/gdino_env.sh`` builds ``.venv-gdino``), and a Ray actor of this
backend runs there (``runtime_env`` with that interpreter, or a node started from it). The
package is imported when the backend is built, never at module import, so configs naming it
validate anywhere.

Prompts, token-to-tag mapping, thresholds, NMS and limits are those of the transformers backend
(``annotate.detectors.grounding_dino``): only the model and its input transform differ. ``config``
is the original Python config file (``GroundingDINO_SwinT_OGC.py``; the names ``swint_ogc`` and
``swinb_cogcoor`` pick the two the package ships), ``checkpoint`` the original ``.pth``, read with
``torch.load(weights_only=True)``. The original code builds its text encoder with
``BertModel.from_pretrained(text_encoder_type)`` before the checkpoint overwrites its weights;
offline, ``text_encoder`` points at a local ``bert-base-uncased`` directory.
"""

from __future__ import annotations

import importlib.resources
import os

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from annotate.detectors.grounding_dino import GroundingDinoDetector

SHIPPED_CONFIGS = {
    "swint_ogc": "GroundingDINO_SwinT_OGC.py",
    "swinb_cogcoor": "GroundingDINO_SwinB_cfg.py",
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class GroundingDinoPySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str = "swint_ogc"  # a shipped config name or an original config file
    checkpoint: str  # the original .pth (groundingdino_swint_ogc.pth, ...)
    text_encoder: str | None = None  # local bert-base-uncased directory; default: the config's
    image_side: PositiveInt = 800  # shorter side, as the original's inference transform
    max_side: PositiveInt = 1333
    box_threshold: float = Field(0.25, ge=0.0, le=1.0)
    text_threshold: float = Field(0.20, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    min_box_size: float = Field(0.02, ge=0.0, lt=1.0)
    max_instances: PositiveInt = 16
    max_text_tokens: PositiveInt | None = None  # default: the model's max_text_len


def config_path(name: str) -> str:
    if name in SHIPPED_CONFIGS:
        return str(importlib.resources.files("groundingdino.config") / SHIPPED_CONFIGS[name])
    if not os.path.isfile(name):
        raise ValueError(f"Grounding-DINO config {name!r} is neither shipped nor a file")
    return name


def load_original(settings: GroundingDinoPySettings) -> torch.nn.Module:
    """The original model with the checkpoint's weights; every weight must be in the file."""
    from groundingdino.models import build_model
    from groundingdino.util.misc import clean_state_dict
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(config_path(settings.config))
    if settings.text_encoder is not None:
        args.text_encoder_type = settings.text_encoder
    args.device = "cpu"
    model = build_model(args)
    checkpoint = torch.load(settings.checkpoint, map_location="cpu", weights_only=True)
    state = clean_state_dict(checkpoint.get("model", checkpoint))
    missing, _ = model.load_state_dict(state, strict=False)
    parameters = dict(model.named_parameters())
    missing = [key for key in missing if key in parameters]  # buffers follow from the config
    if missing:
        raise ValueError(f"{settings.checkpoint} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model.eval()


class GroundingDinoPyDetector(GroundingDinoDetector):
    Settings = GroundingDinoPySettings
    packages = ("torch", "groundingdino-py", "transformers")

    def __init__(self, settings: GroundingDinoPySettings, device: str):
        import groundingdino.datasets.transforms as T

        self.settings, self.device = settings, device
        self.model = load_original(settings).to(device)
        self.tokenizer = self.model.tokenizer
        self.max_tokens = min(
            settings.max_text_tokens or self.model.max_text_len, self.model.max_text_len
        )
        self._token_counts: dict[str, int] = {}
        self.transform = T.Compose(
            [
                T.RandomResize([settings.image_side], max_size=settings.max_side),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _forward(
        self, images: list, prompts: list[str], text: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        pixels = [self.transform(image, None)[0].to(self.device) for image in images]
        outputs = self.model(nested_tensor_from_tensor_list(pixels), captions=prompts)
        length = text["input_ids"].shape[1]
        probabilities = outputs["pred_logits"][:, :, :length].sigmoid()
        return probabilities.float().cpu(), outputs["pred_boxes"].float().cpu()
