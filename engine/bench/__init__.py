"""Benchmarks: commands that print figures and write JSON to assets/results/.

See docs/architecture.md for the layers and why the package is cut this way.
"""
