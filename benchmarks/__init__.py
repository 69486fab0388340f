"""Speed measured against a baseline in the same run; run from the repository root as `python -m benchmarks.NAME`."""
