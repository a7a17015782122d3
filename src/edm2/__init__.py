"""edm2: training, sampling, post-hoc EMA and evaluation of EDM2 diffusion models."""
__version__ = "0.1.0"
