"""The base configuration; it lives in the package (tdm_jax/default_config.py) so that
per-model configs can import it wherever they run from."""

from tdm_jax.default_config import get_config  # pylint: disable=unused-import
