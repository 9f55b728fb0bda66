"""Models that go wrong on purpose, for the tests of how dsgd ends a run that cannot work.

Named on the command line like any model (``--model tests.models:raising_metrics``); the
repository root is on the path of every process the tests start.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from dsgd.examples.digits import digits_mlp
from dsgd.model import ModelSpec


def metrics_that_raise(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A user's metrics function with a bug: it looks up a key that is not there."""
    return {"accuracy": {"top1": 1.0}["top5"]}


def raising_metrics(seed: int = 0) -> ModelSpec:
    """The digits MLP, whose metrics function raises KeyError at every evaluation."""
    return dataclasses.replace(digits_mlp(seed), metrics=metrics_that_raise)


def grad_that_raises(params: Any, batch: Any) -> Any:
    """A user's gradient function with a bug that shows on the first batch."""
    raise ValueError("expected 4 feature columns, got 64")


def raising_grad(seed: int = 0) -> ModelSpec:
    """The digits MLP with a grad function that raises at the first step."""
    return dataclasses.replace(digits_mlp(seed), loss=None, grad=grad_that_raises)


def raising_factory(seed: int = 0) -> ModelSpec:
    """A factory that cannot build its model (its data file is missing)."""
    raise FileNotFoundError("no such file: 'data/train.csv'")


def grad_that_dies(params: Any, batch: Any) -> Any:
    """A gradient that takes its process down, the way a native crash would."""
    os._exit(1)


def dying_worker(seed: int = 0) -> ModelSpec:
    """The digits MLP whose workers die at their first step, every time (a crash loop)."""
    return dataclasses.replace(digits_mlp(seed), loss=None, grad=grad_that_dies)


def nan_features(seed: int = 0) -> ModelSpec:
    """The digits MLP with one NaN pixel in its training data."""
    spec = digits_mlp(seed)
    x = spec.dataset.x_train.copy()
    x[5, 3, 3, 0] = np.nan
    return dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, x_train=x))


def labels_out_of_range(seed: int = 0) -> ModelSpec:
    """The digits MLP (10 outputs) with labels shifted to 5..14."""
    spec = digits_mlp(seed)
    data = spec.dataset
    shifted = dataclasses.replace(data, y_train=data.y_train + 5, y_test=data.y_test + 5)
    return dataclasses.replace(spec, dataset=shifted)
