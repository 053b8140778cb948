"""Detectors: boxes for an image's tags (Grounding-DINO) and the choice among raw detections."""
