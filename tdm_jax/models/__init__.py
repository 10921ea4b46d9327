"""Denoiser networks used by teachers and students."""
