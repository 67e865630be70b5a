"""Benchmarks: llama-bench's method, runs with their history, reports, and the tuning sweep."""
