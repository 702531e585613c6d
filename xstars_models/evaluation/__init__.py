"""Evaluation of X-STARS encoders, always beside baselines on the same data (the same
architecture at random initialisation, and raw pixels).

- ``retrieval``: cross-sensor retrieval of co-registered pairs (recall@k).
- ``landcover``: kNN and linear-probe land-cover accuracy on the bundled labelled chips
  (a fixed spatial split, or spatial cross-validation over whole blocks).
- ``common``: the features both compare and their baselines (raw pixels; random initialisation
  drawn from its own seed, leaving the caller's random state untouched)."""

from __future__ import annotations

from .landcover import (
    LandcoverChips,
    balanced_accuracy,
    knn_accuracy,
    knn_predict,
    landcover_scores,
    landcover_table,
    linear_probe_accuracy,
    linear_probe_predict,
    load_landcover_chips,
    spatial_folds,
)
from .retrieval import cross_sensor_retrieval, recall_at_k, retrieval_table

__all__ = [
    "LandcoverChips",
    "balanced_accuracy",
    "cross_sensor_retrieval",
    "knn_accuracy",
    "knn_predict",
    "landcover_scores",
    "landcover_table",
    "linear_probe_accuracy",
    "linear_probe_predict",
    "load_landcover_chips",
    "recall_at_k",
    "retrieval_table",
    "spatial_folds",
]
