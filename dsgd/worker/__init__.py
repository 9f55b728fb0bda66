"""A worker: one model replica.

- :mod:`dsgd.worker.replica`: the DistBelief Downpour loop (fetch, compute, push);
- :mod:`dsgd.worker.process`: the process (``python -m dsgd.worker``): register,
  train beside the heartbeats, leave.
"""
