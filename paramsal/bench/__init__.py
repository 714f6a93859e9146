"""Benchmark cases and baselines (the harness and the `paramsal bench` command grow here)."""
