"""A model whose gradient is written in NumPy: softmax regression on the digits.

JAX cannot trace ``grad`` (it calls NumPy on the parameters), so dsgd runs it eagerly on
float32 NumPy arrays and says so in the worker log and in ``dsgd status``. ``apply`` is
NumPy too, and is evaluated the same way::

    scripts/start_cluster.sh --model dsgd.examples.numpy_digits:digits_softmax \\
        --target accuracy>=0.93
"""

from __future__ import annotations

import numpy as np

from dsgd.examples.digits import digits_dataset
from dsgd.model import ModelSpec

Params = dict[str, np.ndarray]


def apply(params: Params, x: np.ndarray) -> np.ndarray:
    """Logits of a linear model on the flattened 8x8 images."""
    return np.asarray(x).reshape(len(x), -1) @ params["w"] + params["b"]


def grad(params: Params, batch: tuple[np.ndarray, np.ndarray]) -> tuple[float, Params]:
    """Mean cross-entropy and its gradient, by hand."""
    x, y = batch
    x = np.asarray(x).reshape(len(x), -1)
    logits = x @ params["w"] + params["b"]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.mean(np.log(p[np.arange(n), y] + 1e-12))
    p[np.arange(n), y] -= 1.0  # d loss / d logits, times n
    return float(loss), {"w": x.T @ p / n, "b": p.mean(axis=0)}


def digits_softmax(seed: int = 0) -> ModelSpec:
    rng = np.random.default_rng(seed)
    params = {
        "w": (rng.standard_normal((64, 10)) * 0.01).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }
    return ModelSpec(
        init_params=params,
        apply=apply,
        grad=grad,
        dataset=digits_dataset(),
        batch_size=32,
        name="digits-softmax-numpy",
    )
