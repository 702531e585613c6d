"""Evaluation of X-STARS encoders, always beside baselines on the same data (the same
architecture at random initialisation, and raw pixels).

- ``retrieval``: cross-sensor retrieval of co-registered pairs (recall@k).
- ``landcover``: kNN and linear-probe land-cover accuracy on the bundled labelled chips
  (a fixed spatial split, or spatial cross-validation over whole blocks).
- ``classifiers``: the kNN, the linear probe, balanced accuracy and spatial folds, on any
  features.
- ``common``: the features both compare and their baselines (raw pixels; random initialisation
  drawn from its own seed, leaving the caller's random state untouched)."""

from __future__ import annotations

from .classifiers import (
    balanced_accuracy,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    linear_probe_predict,
    spatial_folds,
)
from .landcover import LandcoverChips, landcover_scores, landcover_table, load_landcover_chips
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
