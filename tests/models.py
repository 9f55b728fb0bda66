"""Models that go wrong on purpose, for the tests of how dsgd ends a run that cannot work.

Named on the command line like any model (``--model tests.models:raising_metrics``); the
repository root is on the path of every process the tests start.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsgd.examples.digits import digits_mlp
from dsgd.model import ModelSpec


def metrics_that_raise(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A user's metrics function with a bug: it looks up a key that is not there."""
    return {"accuracy": {"top1": 1.0}["top5"]}


def raising_metrics(seed: int = 0) -> ModelSpec:
    """The digits MLP, whose metrics function raises KeyError at every evaluation."""
    return dataclasses.replace(digits_mlp(seed), metrics=metrics_that_raise)
