"""dsgd: Downpour SGD on a sharded asyncio parameter server.

The public API: :func:`train` runs a local cluster from Python; :class:`ModelSpec`
describes a model; :class:`TrainConfig` holds the knobs.
"""

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
    Stale,
)
from dsgd.layout import Layout
from dsgd.local import TrainResult, train
from dsgd.model import Dataset, ModelSpec, load_model, softmax_cross_entropy

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
    "Stale",
    "TrainConfig",
    "TrainResult",
    "Dataset",
    "ModelSpec",
    "load_model",
    "softmax_cross_entropy",
    "train",
]
