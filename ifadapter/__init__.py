"""IFAdapter: instance feature control for grounded text-to-image generation on a frozen SDXL."""

from ifadapter.adapter import DEFAULT_LAYER_PATTERNS, IFAdapter
from ifadapter.layout import Instance, Layout, LayoutTensors
from ifadapter.loss import DiffusionBatch, diffusion_loss
from ifadapter.pipeline import IFAdapterSDXLPipeline
from ifadapter.text import InstanceFeatures, encode_instances
from ifadapter.visualize import draw_layout

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
