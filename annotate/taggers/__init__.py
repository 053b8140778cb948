"""Taggers: the tags of an image (RAM/RAM++, CLIP) and their vocabularies."""
