"""Reproducible benchmarks (`make bench`); figures go to docs/benchmarks.md. Not tests."""
