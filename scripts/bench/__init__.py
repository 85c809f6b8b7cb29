"""The benchmark harness's modes, one module per question (`scripts/benchmark.py --mode NAME` dispatches here)."""
