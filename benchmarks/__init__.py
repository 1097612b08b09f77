"""Benchmarks for l2o_jax (python -m benchmarks.run); see benchmarks/RESULTS.md."""
