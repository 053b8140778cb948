"""Plumbing shared by every package of the project: profiles (``profiles``), atomic writes and
digests (``files``). Light to import: no torch, Ray, Prefect or Parquet."""
