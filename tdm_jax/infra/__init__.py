"""Infrastructure: checkpoints, multi-process runs, sharding, atomic files, metrics, FLOPs, errors, prompt sources."""
