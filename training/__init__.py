"""Training IFAdapter on a frozen SDXL from annotated shards (Ray Train)."""
