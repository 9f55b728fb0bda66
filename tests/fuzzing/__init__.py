"""Fuzzing the shard: the fault catalogue (:mod:`.catalogue`) and a shard to fire it at
(:mod:`.harness`). ``tests/test_fuzz.py`` drives them with Hypothesis, ``python -m
bench.fuzz_shard`` with numpy."""
