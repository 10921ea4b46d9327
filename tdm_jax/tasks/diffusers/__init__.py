"""The Diffusers task: a text-to-image pipeline folder (SD 1.5 / 2.x, SDXL, PixArt-alpha / -Sigma) in Flax, distilled as a TDM task."""
