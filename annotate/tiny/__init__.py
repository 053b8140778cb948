"""Tiny random-weight models of the real architectures, for tests, benchmarks, tiny profile."""
