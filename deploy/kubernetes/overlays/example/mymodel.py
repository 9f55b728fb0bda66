"""The example overlay's model, mounted at /models: the README's iris MLP."""

import jax
import numpy as np
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

import dsgd


def apply(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def iris(seed: int = 0) -> dsgd.ModelSpec:
    x, y = load_iris(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, y.astype(np.int32), test_size=0.2, stratify=y, random_state=0
    )
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 0.5, (4, 32)).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "w2": rng.normal(0, 0.5, (32, 3)).astype(np.float32),
        "b2": np.zeros(3, np.float32),
    }
    return dsgd.ModelSpec(
        init_params=params,
        apply=apply,
        loss=dsgd.softmax_cross_entropy,
        dataset=dsgd.Dataset(xtr, ytr, xte, yte),
        batch_size=16,
    )
