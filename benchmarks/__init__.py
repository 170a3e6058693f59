"""Benchmarks, run on demand (`make bench` or `python -m benchmarks`). Each prints ratios against a
baseline measured in the same run: absolute times on shared machines are not comparable."""
