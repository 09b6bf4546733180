"""Benchmarks against the reference libraries, run by ``nanomm bench NAME``: ratios measured in one run."""
