"""The bundled example: a small CNN on scikit-learn's digits (8x8 images, 10 classes).

The data ships with scikit-learn (no download). The held-out test split is a
stratified 20% with a fixed seed, so every run is evaluated on the same images.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from dsgd.model import Dataset, ModelSpec, softmax_cross_entropy

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@cache
def digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, values in [0, 1]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    return Dataset(x_train, y_train, x_test, y_test)


def _conv(x: Any, w: Any, b: Any) -> Any:
    import jax

    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(y + b)


def cnn_apply(params: dict[str, Any], x: Any) -> Any:
    """conv3x3(16) -> conv3x3(32) -> maxpool 2x2 -> dense 64 -> dense 10 (logits)."""
    import jax
    import jax.numpy as jnp

    h = _conv(x, params["conv1_w"], params["conv1_b"])
    h = _conv(h, params["conv2_w"], params["conv2_b"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense1_w"] + params["dense1_b"])
    return h @ params["dense2_w"] + params["dense2_b"]


def cnn_init(seed: int) -> dict[str, np.ndarray]:
    """He-initialised parameters (numpy, float32)."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1_w": he((3, 3, 1, 16), 9),
        "conv1_b": np.zeros(16, np.float32),
        "conv2_w": he((3, 3, 16, 32), 9 * 16),
        "conv2_b": np.zeros(32, np.float32),
        "dense1_w": he((4 * 4 * 32, 64), 4 * 4 * 32),
        "dense1_b": np.zeros(64, np.float32),
        "dense2_w": he((64, 10), 64),
        "dense2_b": np.zeros(10, np.float32),
    }


def digits_cnn(seed: int = 0) -> ModelSpec:
    """The default model of ``scripts/start_cluster.sh``."""
    return ModelSpec(
        init_params=cnn_init(seed),
        apply=cnn_apply,
        loss=softmax_cross_entropy,
        dataset=digits_dataset(),
        batch_size=32,
        name="digits-cnn",
    )


def mlp_apply(params: dict[str, Any], x: Any) -> Any:
    import jax

    h = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def digits_mlp(seed: int = 0) -> ModelSpec:
    """A one-hidden-layer MLP on the same data: fast to compile, good for tests."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": (rng.standard_normal((64, 64)) * np.sqrt(2 / 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": (rng.standard_normal((64, 10)) * np.sqrt(2 / 64)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    return ModelSpec(
        init_params=params,
        apply=mlp_apply,
        loss=softmax_cross_entropy,
        dataset=digits_dataset(),
        batch_size=32,
        name="digits-mlp",
    )
