"""The shapes task: a procedural captioned dataset, the shipped teachers made from it (SDXL-style and PixArt-style), and its attribute classifier."""
