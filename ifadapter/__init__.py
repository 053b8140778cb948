"""IFAdapter: instance feature control for grounded text-to-image generation on a frozen SDXL.

The public names load on first use (as diffusers' own top level does), so that the console
script answers ``--help`` without importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("ifadapter")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "DEFAULT_LAYER_PATTERNS": "ifadapter.adapter",
    "IFAdapter": "ifadapter.adapter",
    "Instance": "ifadapter.layout",
    "Layout": "ifadapter.layout",
    "LayoutTensors": "ifadapter.layout",
    "DiffusionBatch": "ifadapter.loss",
    "diffusion_loss": "ifadapter.loss",
    "IFAdapterSDXLPipeline": "ifadapter.pipeline",
    "InstanceFeatures": "ifadapter.text",
    "encode_instances": "ifadapter.text",
    "draw_layout": "ifadapter.visualize",
}

__all__ = [
    "DEFAULT_LAYER_PATTERNS",
    "DiffusionBatch",
    "IFAdapter",
    "IFAdapterSDXLPipeline",
    "Instance",
    "InstanceFeatures",
    "Layout",
    "LayoutTensors",
    "diffusion_loss",
    "draw_layout",
    "encode_instances",
]

if TYPE_CHECKING:
    from ifadapter.adapter import DEFAULT_LAYER_PATTERNS, IFAdapter
    from ifadapter.layout import Instance, Layout, LayoutTensors
    from ifadapter.loss import DiffusionBatch, diffusion_loss
    from ifadapter.pipeline import IFAdapterSDXLPipeline
    from ifadapter.text import InstanceFeatures, encode_instances
    from ifadapter.visualize import draw_layout


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ifadapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
