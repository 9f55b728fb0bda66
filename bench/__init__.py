"""Benchmarks: transport, codec and end-to-end; each writes JSON and a PNG."""
