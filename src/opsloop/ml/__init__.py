"""Model lifecycle and scoring: features, training, MLflow registry, promotion, scoring, drift.

Only :mod:`opsloop.ml.registry` imports mlflow; everything else works on plain sklearn objects,
Arrow batches and the warehouse protocol.
"""
