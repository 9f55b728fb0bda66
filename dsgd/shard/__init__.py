"""A parameter shard, in three layers (ps-lite's split between transport and server handle):

- :mod:`dsgd.shard.core`: the state and the rules (checks, at-most-once, apply, fetch
  planning, stats), with no sockets;
- :mod:`dsgd.shard.server`: the ZeroMQ ROUTER/PUB transport around the core;
- :mod:`dsgd.shard.process`: the process (``python -m dsgd.shard``): restore, register,
  serve, checkpoint, leave.

:mod:`dsgd.shard.client` is the other end of the data plane, used by workers and the
evaluator.
"""
