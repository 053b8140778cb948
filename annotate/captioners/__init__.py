"""Captioners: a global caption and one per instance, from a VLM or without a model."""
