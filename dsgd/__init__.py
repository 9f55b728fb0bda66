"""dsgd: Downpour SGD on a sharded asyncio parameter server.

The public API: :func:`train` runs a local cluster from Python; :class:`ModelSpec`
describes a model; :class:`TrainConfig` holds the knobs.
"""

from typing import TYPE_CHECKING

from dsgd.config import TrainConfig
from dsgd.errors import (
    CheckpointError,
    Closed,
    ConfigError,
    DsgdError,
    LayoutMismatch,
    ModelError,
    PeerLost,
    ProtocolError,
)
from dsgd.layout import Layout
from dsgd.model import (
    Dataset,
    ModelSpec,
    default_metrics,
    load_model,
    mean_squared_error,
    softmax_cross_entropy,
)

__all__ = [
    "CheckpointError",
    "Closed",
    "ConfigError",
    "DsgdError",
    "Layout",
    "LayoutMismatch",
    "ModelError",
    "PeerLost",
    "ProtocolError",
    "TrainConfig",
    "TrainResult",
    "Dataset",
    "ModelSpec",
    "default_metrics",
    "load_model",
    "mean_squared_error",
    "softmax_cross_entropy",
    "train",
]

if TYPE_CHECKING:
    from dsgd.local import TrainResult, train


def __getattr__(name: str) -> object:
    # dsgd.train pulls in every role; importing it lazily keeps ``python -m dsgd.worker``
    # (and the JAX-free shard) from importing modules they are about to run as __main__
    if name in ("train", "TrainResult"):
        from dsgd import local

        return getattr(local, name)
    raise AttributeError(f"module 'dsgd' has no attribute {name!r}")
