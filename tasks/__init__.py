"""Thin Prefect task wrappers: take a block reference and small parameters, call one core function,
return something small (counts, table names, URIs) — never a large DataFrame."""
