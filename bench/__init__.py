"""Benchmarks (not timed tests): run as modules from the repository root, e.g. python -m bench.sampler_overhead."""
