"""The shapes task: a procedural captioned dataset, the shipped teacher made from it, and its attribute classifier."""
