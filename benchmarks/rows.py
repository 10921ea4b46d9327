"""The benchmark rows of issue 11 as run configs, shared by iteration.py, sampling.py and compile_cache.py."""

SIZES = ("shapes", "sdxl256", "sdxl1024")


def row_config(size: str, batch_size: int = 0):
  """configs/shapes.py (batch 32), or configs/sdxl.py shape-only (random weights from the published
  configs) at 256 / 1024 px, batch 1, on one device."""
  if size not in SIZES:
    raise ValueError(f"size {size!r}; expected one of {SIZES}")
  if size == "shapes":
    from configs import shapes  # pylint: disable=g-import-not-at-top
    config = shapes.get_config()
  else:
    from configs import sdxl  # pylint: disable=g-import-not-at-top
    config = sdxl.get_config()
    config.model.resolution = 256 if size == "sdxl256" else 1024
    config.train.batch_size = 1
    config.mesh.shape = (1, 1, 1)
  if batch_size:
    config.train.batch_size = batch_size
  config.train.progress = False
  return config
