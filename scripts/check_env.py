"""Fails the set-up when pip resolved a torch other than the pinned one.

A silently swapped torch (a CPU 2.13 wheel, or a CUDA build pulled in by another package) breaks
torchvision's operators and with them diffusers' SDXL import, so the set-up stops here instead.
"""

import re
import sys
from pathlib import Path

import torch
import torchvision

pins = dict(
    re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
    for line in Path(__file__).resolve().parents[1].joinpath("constraints.txt").read_text().split()
    if "==" in line
)
for module in (torch, torchvision):
    installed = module.__version__.split("+")[0]
    if installed != pins[module.__name__]:
        pinned = pins[module.__name__]
        sys.exit(f"{module.__name__} {installed} is installed but constraints.txt pins {pinned}")
import diffusers.pipelines.stable_diffusion_xl  # noqa: E402,F401  (fails when torchvision is broken)

print(f"environment ok: torch {torch.__version__}, torchvision {torchvision.__version__}")
