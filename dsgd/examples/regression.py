"""A regression example: an MLP fitting Friedman's benchmark function #1.

``y = 10 sin(pi x0 x1) + 20 (x2 - 0.5)^2 + 10 x3 + 5 x4 + noise`` on 10 uniform inputs
(5 of them irrelevant), from scikit-learn's generator (no download). The targets are
standardised, so a model that predicts the mean has an MSE of 1 and an R^2 of 0; the
noise (sigma 1 before standardising) puts the best possible test MSE near 0.04.
Float labels make the default metrics report ``mse`` and ``r2``; the loss is the MSE::

    scripts/start_cluster.sh --model dsgd.examples.regression:friedman_mlp --target loss<=0.1
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from dsgd.model import Dataset, ModelSpec, mean_squared_error

EXAMPLES = 4000
TEST_FRACTION = 0.2


@cache
def friedman_dataset(seed: int = 0) -> Dataset:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=EXAMPLES, n_features=10, noise=1.0, random_state=seed)
    split = int(EXAMPLES * (1 - TEST_FRACTION))
    mean, std = y[:split].mean(), y[:split].std()
    x = ((x - 0.5) * np.sqrt(12)).astype(np.float32)  # zero mean, unit variance
    y = ((y - mean) / std).astype(np.float32)
    return Dataset(x[:split], y[:split], x[split:], y[split:])


def mlp_apply(params: dict[str, Any], x: Any) -> Any:
    import jax

    h = jax.nn.tanh(x @ params["w1"] + params["b1"])
    h = jax.nn.tanh(h @ params["w2"] + params["b2"])
    return (h @ params["w3"] + params["b3"])[:, 0]


def friedman_mlp(seed: int = 0) -> ModelSpec:
    """10 -> 64 -> 64 -> 1, tanh, trained on the mean squared error."""
    rng = np.random.default_rng(seed)

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        scale = np.sqrt(2.0 / (fan_in + fan_out))
        return (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)

    params = {
        "w1": glorot(10, 64),
        "b1": np.zeros(64, np.float32),
        "w2": glorot(64, 64),
        "b2": np.zeros(64, np.float32),
        "w3": glorot(64, 1),
        "b3": np.zeros(1, np.float32),
    }
    return ModelSpec(
        init_params=params,
        apply=mlp_apply,
        loss=mean_squared_error,
        dataset=friedman_dataset(),
        batch_size=32,
        name="friedman-mlp",
    )
