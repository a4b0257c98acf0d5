"""Reproducible benchmarks for GradTrust Serve (run as ``python -m bench.<script>``)."""
