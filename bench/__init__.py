"""Benchmarks (``make bench``) and the demo (``make demo``)."""
