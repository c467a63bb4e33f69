"""Benchmarks: each runs a baseline and the project's way in the same process and prints ratios."""
