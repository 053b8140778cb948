"""The benchmark's detector and judge backends: Grounding-DINO, VLM judges, the toy world's."""
