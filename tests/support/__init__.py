"""Helpers the tests share: tiny models, oracles, runs and folders to compare."""
