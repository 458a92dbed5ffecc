"""Benchmarks (not timed tests): run as modules from the repository root, e.g. python -m benchmarks.sampler_overhead."""
