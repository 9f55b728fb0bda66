"""The model bench.failover's workers train: a fixed gradient of small integers.

``python -m dsgd.worker`` loads it as ``bench._fixed_gradient:fixed_gradient`` (the
coordinator names it): its ``grad`` ignores the parameters and returns
:func:`worker_gradient` of the worker's data partition, so every sum the shards make is
exact in float32 with a learning rate of 2**-10, and the parameters after a run say how
many steps of each worker they hold (:func:`applied_steps`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsgd.model import Dataset, ModelSpec

MODEL = "bench._fixed_gradient:fixed_gradient"
LR = 2.0**-10  # with small integer gradients every sum is exact in float32
PERIOD = 9  # the gradient repeats every PERIOD entries; worker w's is shifted by w
MAX_WORKERS = PERIOD - 1  # so many shifts are linearly independent (see applied_steps)


def worker_gradient(partition: int, size: int, start: int = 0) -> np.ndarray:
    """What :func:`fixed_gradient`'s ``grad`` returns to the worker of ``partition``
    (entries ``start`` to ``start + size``)."""
    index = np.arange(start, start + size)
    return ((index + partition) % PERIOD - PERIOD // 2).astype(np.float32)


def fixed_gradient(params: int = 1_000_000, workers: int = 2) -> ModelSpec:
    """One float32 vector of ``params`` zeros; ``grad`` returns :func:`worker_gradient` of
    the batch's partition whatever the parameters. Training row i holds ``i % workers``,
    and a worker's partition is every ``workers``-th row, so each batch names its
    worker's partition."""
    import jax.numpy as jnp

    rows = (np.arange(2 * workers) % workers).astype(np.float32).reshape(-1, 1)
    labels = np.zeros(len(rows), np.int32)

    def grad(_params: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        partition = batch[0][0, 0].astype(jnp.int32)
        index = jnp.arange(params, dtype=jnp.int32)
        values = ((index + partition) % PERIOD - PERIOD // 2).astype(jnp.float32)
        return jnp.float32(0.0), {"w": values}

    return ModelSpec(
        init_params={"w": np.zeros(params, np.float32)},
        apply=lambda _params, x: x,
        grad=grad,
        dataset=Dataset(rows, labels, rows, labels),
        batch_size=1,
        name="fixed-gradient",
    )


def expected_params(steps: dict[int, int], size: int, start: int = 0) -> np.ndarray:
    """``-lr * sum_w steps_w * g_w``: the parameters when every step was applied once
    (entries ``start`` to ``start + size``)."""
    total = np.zeros(size, np.float64)
    for partition, n in steps.items():
        total += n * worker_gradient(partition, size, start).astype(np.float64)
    return (-LR * total).astype(np.float32)


def applied_steps(
    params: np.ndarray, workers: int, bounds: list[tuple[int, int]]
) -> list[list[int] | None]:
    """Per chunk of the pushes (``bounds``: each chunk's range, which a shard applies
    whole), the steps of each worker whose gradient ``params`` hold there (None: no whole
    numbers of steps give exactly these values). A chunk's first entries decide it: the
    workers' gradients there are independent shifts of one sequence."""
    held: list[list[int] | None] = []
    for start, stop in bounds:
        size = min(stop - start, 4 * PERIOD)
        basis = np.stack([worker_gradient(w, size, start) for w in range(workers)], axis=1)
        solved, *_ = np.linalg.lstsq(
            basis.astype(np.float64), params[start : start + size] / -LR, rcond=None
        )
        steps = [round(float(n)) for n in solved]
        exact = expected_params(dict(enumerate(steps)), stop - start, start)
        held.append(steps if np.array_equal(exact, params[start:stop]) else None)
    return held
