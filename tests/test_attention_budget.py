"""check_attention_fits: a clear ConfigError, before anything compiles, where an attention setting would hold
the whole score matrix (pure arithmetic: no tracing, no compile)."""

import pytest

from tdm_jax.infra.errors import ConfigError
from tdm_jax.models import attention

COGVIDEOX_TOKENS = 17_550 + 226  # 13 latent frames x 30 x 45 patches at 49 x 480 x 720, plus T5's 226
COGVIDEOX_2B_HEADS = 30


def test_xla_at_cogvideox_size_is_refused_naming_the_setting():
  with pytest.raises(ConfigError) as e:
    attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 1, "xla", platform="cpu")
  message = str(e.value)
  assert "\n" not in message
  assert "model.attention='xla'" in message
  assert "17,776" in message
  assert "35.3 GiB" in message  # 17,776^2 x 30 heads x 4 bytes
  assert '"chunked"' in message


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_chunked_passes_at_cogvideox_size(platform):
  attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 2, "chunked",
                                 platform=platform)


def test_short_sequence_with_xla_passes():
  attention.check_attention_fits(333, 333, 24, 16, "xla", platform="cpu")  # SD3's text tokens, batch 16


def test_auto_follows_the_platform():
  attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 2, "auto", platform="cpu")
  attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 2, "auto", platform="tpu")
  # On GPU "auto" is jax.nn.dot_product_attention (JAX's XLA path: the whole logits) only while they fit the
  # budget; CogVideoX's 17,776 tokens take "chunked" there.
  attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 2, "auto", platform="gpu")
  big = attention.score_matrix_bytes(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 2)
  assert attention.resolve_implementation("auto", COGVIDEOX_TOKENS, platform="gpu", score_bytes=big) == "chunked"
  with pytest.raises(ConfigError, match="model.attention='dot_product_attention'"):
    attention.check_attention_fits(COGVIDEOX_TOKENS, COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS, 1,
                                   "dot_product_attention", platform="cpu")


def test_splash_refused_only_where_it_takes_the_plain_path():
  n, h = COGVIDEOX_TOKENS, COGVIDEOX_2B_HEADS
  attention.check_attention_fits(n, n, h, 1, "splash", platform="tpu")
  attention.check_attention_fits(n, n, h, 1, "splash", platform="tpu", mask="key_padding")
  attention.check_attention_fits(n, n, h, 1, "splash", platform="tpu", causal=True)
  for kw in ({"mask": "other"}, {"mask": "key_padding", "causal": True}):
    with pytest.raises(ConfigError, match="model.attention='splash'"):
      attention.check_attention_fits(n, n, h, 1, "splash", platform="tpu", **kw)


def test_budget_is_the_boundary():
  size = attention.score_matrix_bytes(4096, 4096, 16, 2)
  assert size == 4096 * 4096 * 16 * 2 * 4
  attention.check_attention_fits(4096, 4096, 16, 2, "xla", platform="cpu", budget_bytes=size)
  with pytest.raises(ConfigError):
    attention.check_attention_fits(4096, 4096, 16, 2, "xla", platform="cpu", budget_bytes=size - 1)
  assert attention.SCORE_MATRIX_BUDGET_BYTES == 4 * 2 ** 30


def test_resolve_matches_the_docstring():
  r = attention.resolve_implementation
  assert r("auto", 4096, platform="cpu") == "chunked"
  assert r("auto", 100, platform="cpu") == "xla"
  assert r("auto", 4096, platform="gpu") == "dot_product_attention"
  assert r("auto", 4096, platform="gpu", score_bytes=attention.SCORE_MATRIX_BUDGET_BYTES + 1) == "chunked"
  assert r("auto", 100, platform="gpu") == "xla"
  assert r("auto", 4096, platform="tpu") == "splash"
  assert r("chunked", 100, platform="cpu") == "chunked"
  with pytest.raises(ValueError):
    r("flash", 4096, platform="cpu")
