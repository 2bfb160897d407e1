"""The evaluation layer: statistics, retraining runs, LDS and retrain-top, result loaders.

See docs/architecture.md for the layers and why the package is cut this way.
"""
