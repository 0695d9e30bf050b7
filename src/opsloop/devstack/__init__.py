"""Local stand-ins for the production stack: PostgreSQL from the binaries on PATH, background
services (Prefect server, MLflow server, CRM sandbox, worker) as managed processes.

Used by ``deployments/stack.py`` (``make stack-up``) and by the test fixtures, so the demo and
the tests start services the same way. Nothing here imports Prefect.
"""
