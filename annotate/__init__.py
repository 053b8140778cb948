"""Data engine: images in, annotated Parquet shards out (Ray Data: tag, detect, caption)."""
