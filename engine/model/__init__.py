"""The model layer: data, U-Net, DDPM, sampling, training, checkpoints, measurements.

See docs/architecture.md for the layers and why the package is cut this way.
"""
