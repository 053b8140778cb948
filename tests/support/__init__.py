"""Factories, reference implementations and servers the tests share."""
