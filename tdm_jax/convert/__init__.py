"""Diffusers/Transformers weights <-> our Flax parameter trees, one module per model."""
