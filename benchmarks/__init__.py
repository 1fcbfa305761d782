"""Benchmark harness for entflash: `python -m benchmarks.attention` (see benchmarks/README.md)."""
