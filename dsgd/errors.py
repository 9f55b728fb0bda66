"""Exceptions, named for what happened. Transport-neutral: the gRPC service maps
:class:`Refused` to status codes, the shard's checks answer on the data plane."""

from __future__ import annotations

import enum


class DsgdError(Exception):
    """Base class of every error dsgd raises on purpose."""


class ConfigError(DsgdError):
    """A user mistake in configuration or on the command line; the message says how to fix it."""


class ModelError(ConfigError):
    """The model named on the command line cannot be imported or does not make a valid spec."""


class LayoutMismatch(DsgdError):
    """A peer was built from another model (its layout fingerprint differs)."""


class ProtocolError(DsgdError):
    """A message on the wire is malformed: wrong kind, version, sizes, dtype or values."""


class Closed(DsgdError):
    """The resource was closed by us."""


class PeerLost(DsgdError):
    """A peer stopped answering within its timeout."""


class CheckpointError(DsgdError):
    """A checkpoint is missing, truncated, corrupted or from another model."""


class TaskCrashed(DsgdError):
    """A task of a dsgd process ended with an unexpected exception (the message names it)."""


class Refusal(enum.Enum):
    """Why a request was refused, in terms a caller can act on."""

    INVALID = "invalid"  # the request is malformed or out of range: fix it
    MISMATCH = "mismatch"  # it contradicts the cluster (another model, protocol, state)
    EXHAUSTED = "exhausted"  # the cluster has no room for it
    UNAVAILABLE = "unavailable"  # not now: retry later


class Refused(DsgdError):
    """A request refused with a one-line reason (the service turns it into a status)."""

    def __init__(self, why: Refusal, message: str) -> None:
        super().__init__(message)
        self.why = why
