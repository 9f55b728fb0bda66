"""The original example at its real scale: a 74.8M-parameter CNN on Caltech-101.

Three conv/pool blocks on 96 x 96 RGB images into a 4096-wide dense layer, as in the
networks of that time: almost all of the parameters (74.3M of 74.8M) are in the first
dense layer, so the network, not the arithmetic, is what distributing it costs::

    scripts/start_cluster.sh --model dsgd.examples.caltech101:cnn --data ../shared/caltech101

``--model-arg image_size=48`` (a 18.7M-parameter model that learns in minutes) is the
quick path. The images are decoded once into a uint8 cache beside the data
(:mod:`dsgd.datasets.caltech101`) and kept as uint8: each batch is normalised inside the
jitted step, and augmented (random shifts of up to 1/12 of the side, horizontal flips,
seeded) on the way in.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dsgd.datasets import caltech101
from dsgd.errors import ModelError
from dsgd.model import Dataset, ModelSpec, Rows, softmax_cross_entropy

CHANNELS = (32, 64, 126)  # three conv3x3 + maxpool2 blocks
HIDDEN = 4096
DATA_ENV = "DSGD_CALTECH101"  # where the data is when --data is not given


def cnn_init(seed: int, image_size: int, classes: int) -> dict[str, np.ndarray]:
    """He-initialised parameters (float32)."""
    if image_size % 8:
        raise ModelError(f"image_size must be a multiple of 8 (three 2x2 pools), got {image_size}")
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))).astype(
            np.float32
        )

    params: dict[str, np.ndarray] = {}
    previous = 3
    for k, width in enumerate(CHANNELS, start=1):
        params[f"conv{k}_w"] = he((3, 3, previous, width), 9 * previous)
        params[f"conv{k}_b"] = np.zeros(width, np.float32)
        previous = width
    flat = (image_size // 8) ** 2 * previous
    params["dense1_w"] = he((flat, HIDDEN), flat)
    params["dense1_b"] = np.zeros(HIDDEN, np.float32)
    params["dense2_w"] = he((HIDDEN, classes), HIDDEN)
    params["dense2_b"] = np.zeros(classes, np.float32)
    return params


def cnn_apply(params: dict[str, Any], x: Any) -> Any:
    """uint8 NHWC images -> logits."""
    import jax
    import jax.numpy as jnp

    h = x.astype(jnp.float32) * (1.0 / 255.0) - 0.5
    for k in range(1, len(CHANNELS) + 1):
        h = jax.lax.conv_general_dilated(
            h,
            params[f"conv{k}_w"],
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = jax.nn.relu(h + params[f"conv{k}_b"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense1_w"] + params["dense1_b"])
    return h @ params["dense2_w"] + params["dense2_b"]


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts (edge-padded, up to 1/12 of the side) and horizontal flips."""
    n, size = x.shape[0], x.shape[1]
    pad = max(1, size // 12)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, (2, n))
    flip = np.less(rng.random(n), 0.5)
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, dy[i] : dy[i] + size, dx[i] : dx[i] + size]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def cnn(
    seed: int = 0,
    data: str = "",
    image_size: int = 96,
    background: bool = False,
    batch_size: int = 32,
) -> ModelSpec:
    """The CNN on the Caltech-101 folder ``data`` (``--data``; else $DSGD_CALTECH101)."""
    root = data or os.environ.get(DATA_ENV, "")
    if not root:
        raise ModelError(
            "the Caltech-101 model needs its data: give --data DIR (the folder holding "
            f"101_ObjectCategories/) or set {DATA_ENV}"
        )
    images = caltech101.load(root, image_size, background=background)
    train, test = caltech101.split(images, root)
    dataset = Dataset(
        Rows(images.images, train),
        images.labels[train],
        Rows(images.images, test),
        images.labels[test],
    )
    return ModelSpec(
        init_params=cnn_init(seed, image_size, len(images.categories)),
        apply=cnn_apply,
        loss=softmax_cross_entropy,
        dataset=dataset,
        batch_size=batch_size,
        name=f"caltech101-cnn-{image_size}",
        augment=augment,
    )
