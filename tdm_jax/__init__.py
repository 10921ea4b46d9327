"""tdm_jax: distil diffusion models into few-step generators with Trajectory Distribution Matching."""

__version__ = "0.1.0"
