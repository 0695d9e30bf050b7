"""Prefect flows: one @flow per file, file name = flow name. Flows order tasks and summarise."""
