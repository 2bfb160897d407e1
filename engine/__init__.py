"""Diffusion Attribution Explorer engine: DDPM, measurements and data attribution."""

__version__ = "0.1.0"
