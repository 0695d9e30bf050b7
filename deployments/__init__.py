"""Deployment tooling: block bootstrap, local stack commands, Dockerfile and job templates."""
