"""Errors a user fixes (a config value, a missing file, distributed settings), apart from program bugs.

`python -m tdm_jax.main` prints a `UserError` as its message alone and exits with status 2; any
other exception is a bug and keeps its traceback. `--verbosity=1` shows the traceback of both.
"""

from __future__ import annotations


class UserError(Exception):
  """The run cannot go on until the user changes something the message names."""


class ConfigError(UserError, ValueError):
  """A config value, flag or input file's content is wrong."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs does not exist."""


class DistributedError(UserError, RuntimeError):
  """The processes of a multi-process run could not form one job."""


class NonFiniteLossError(UserError, FloatingPointError):
  """A loss became NaN or Inf; the last good checkpoint stays on disk."""
