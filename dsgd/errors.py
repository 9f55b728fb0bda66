"""Exceptions, named for what happened."""

from __future__ import annotations


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


class Stale(DsgdError):
    """An update was computed from parameters too old to apply under the staleness policy."""


class Closed(DsgdError):
    """The resource was closed by us."""


class PeerLost(DsgdError):
    """A peer stopped answering within its timeout."""


class CheckpointError(DsgdError):
    """A checkpoint is missing, truncated, corrupted or from another model."""
