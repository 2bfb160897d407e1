"""The attribution layer: gradients, curvature, banks, scoring, methods, store and session.

See docs/architecture.md for the layers and why the package is cut this way.
"""
