"""The coordinator, in three layers:

- :mod:`dsgd.coordinator.core`: membership, the model's layout, liveness and the end of
  the run, as quick synchronous decisions with no sockets;
- :mod:`dsgd.coordinator.service`: the gRPC adaptor (refusals become status codes);
- :mod:`dsgd.coordinator.process`: the process (``python -m dsgd.coordinator``): the
  time budget, waiting for members to leave, the final parameters.

:mod:`dsgd.coordinator.initial` holds what shards without state start from.
"""
