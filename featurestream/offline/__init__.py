"""Offline feature computation from the raw event archive.

Training sets (``training.py``): ``training_set(labels_df, features)`` returns the labels with
each feature as it would have been served at each row's timestamp; ``write_training_set`` does
the same file to file with bounded memory (``featurestream training-set``). See
docs/training_sets.md. Names load lazily, so importing a sibling module stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featurestream.offline.features import TrainingSetError
    from featurestream.offline.training import TrainingSetSummary, training_set, write_training_set

_LAZY = {
    "TrainingSetError": "featurestream.offline.features",
    "TrainingSetSummary": "featurestream.offline.training",
    "training_set": "featurestream.offline.training",
    "write_training_set": "featurestream.offline.training",
}

__all__ = ["TrainingSetError", "TrainingSetSummary", "training_set", "write_training_set"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featurestream.offline' has no attribute {name!r}")
    return getattr(import_module(module), name)
