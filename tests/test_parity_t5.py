"""Our Flax T5 encoder equals Transformers' T5EncoderModel on the same weights; its converter, config
checks and tokenizer loading take real T5 folders and refuse broken ones by name."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import tiny_t5
from tdm_jax.convert import folders
from tdm_jax.convert.errors import ConversionError
from tdm_jax.convert.folders import FolderError
from tdm_jax.convert.t5 import load_tokenizer, t5_params_from_state_dict, t5_state_dict_from_params
from tdm_jax.infra import sharding
from tdm_jax.infra.errors import ConfigError
from tdm_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets

VOCAB, LENGTH = 80, 40
CASES = {
    # T5 v1.1 (gated-gelu); 40 positions over max_distance 16 reach the logarithmic and the last buckets.
    "gated_gelu": dict(),
    # Original T5's plain relu feed-forward, Transformers' default buckets (32, 128).
    "relu": dict(feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128),
}


@functools.lru_cache(maxsize=None)
def _encode_fn(config, dtype=jnp.float32):
  return jax.jit(T5Encoder(config, dtype=dtype).apply)


def _encode(params, config, ids, mask, dtype=jnp.float32):
  return np.asarray(_encode_fn(config, dtype)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def _prompts(seed=0):
  """Padded prompts: rows of true lengths 40, 17, 5 and 1 (tokens, then eos 1, then pad 0 with mask 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(4, LENGTH)).astype(np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate((LENGTH, 17, 5, 1)):
    ids[row, n - 1] = 1
    ids[row, n:] = 0
    mask[row, :n] = 1
  return ids, mask


def _theirs(model, ids, mask):
  with torch.no_grad():
    return model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _config(model):
  return T5Config.from_dict(model.config.to_dict())


def test_relative_position_buckets_equal_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for length, num_buckets, max_distance in ((LENGTH, 8, 16), (512, 32, 128), (300, 32, 128)):
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    theirs = bucket(rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_float32(case):
  model = tiny_t5.random_t5_encoder(VOCAB, seed=1, **CASES[case])
  config = _config(model)
  assert config.is_gated_act == (case == "gated_gelu")
  state_dict = _state_dict(model)
  assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(state_dict)  # tied: both
  params = t5_params_from_state_dict(state_dict, config)
  ids, mask = _prompts()
  theirs, ours = _theirs(model, ids, mask), _encode(params, config, ids, mask)
  assert ours.shape == (4, LENGTH, config.d_model)
  err = float(np.max(np.abs(ours - theirs)))
  print(f"T5 {case} float32 max abs error {err:.2e} (outputs up to {np.max(np.abs(theirs)):.2f})")
  assert err <= 1e-5, err
  # Padding is masked: the rows' true tokens do not see what follows them.
  ids2 = np.where(mask == 1, ids, 7).astype(np.int32)
  again = _encode(params, config, ids2, mask)
  assert np.max(np.abs((again - ours)[mask == 1])) <= 1e-5


def test_bfloat16_close_to_float32():
  model = tiny_t5.random_t5_encoder(VOCAB, seed=2)
  config = _config(model)
  params = t5_params_from_state_dict(_state_dict(model), config)
  ids, mask = _prompts(seed=1)
  theirs = _theirs(model, ids, mask)
  out = _encode_fn(config, jnp.bfloat16)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  ours = np.asarray(out, np.float32)
  max_rel = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  rms_rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
  print(f"T5 bfloat16 vs float32: max abs error / max abs {max_rel:.2e}, relative rms error {rms_rel:.2e}")
  assert max_rel < 3e-2 and rms_rel < 1.5e-2, (max_rel, rms_rel)
  # bf16 weights too (a frozen teacher's text encoder).
  params16 = t5_params_from_state_dict(_state_dict(model), config, param_dtype=jnp.bfloat16)
  assert params16["block_0"]["feed_forward"]["wo"]["kernel"].dtype == jnp.bfloat16
  ours16 = _encode(params16, config, ids, mask, jnp.bfloat16)
  assert np.linalg.norm(ours16 - theirs) / np.linalg.norm(theirs) < 1.5e-2


def test_every_parameter_is_annotated():
  config = T5Config(vocab_size=VOCAB, **tiny_t5.TINY_ENCODER)
  boxed = jax.eval_shape(lambda: T5Encoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  names = {"/".join(p): leaf.names for p, leaf in
           jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
           for p in [tuple(getattr(k, "key", str(k)) for k in p)]}
  assert all(isinstance(n, tuple) and n for n in names.values()), names
  assert names["shared/embedding"] == ("vocab", "embed")
  assert names["relative_attention_bias"] == ("relpos_buckets", "heads")
  assert names["block_1/self_attention/q/kernel"] == ("embed", "heads")
  assert names["block_1/self_attention/o/kernel"] == ("heads", "embed")
  assert names["block_0/feed_forward/wi_1/kernel"] == ("embed", "mlp")
  assert names["block_0/feed_forward/wo/kernel"] == ("mlp", "embed")
  assert names["final_layer_norm/scale"] == ("norm",)
  # A name the rules do not list is left unsplit.
  assert tuple(nn.logical_to_mesh_axes(("relpos_buckets", "heads"), sharding.DEFAULT_RULES)) == (None, "tensor")


def test_sharded_folder_and_fp16_variant(tmp_path):
  model = tiny_t5.make_tiny_t5_encoder(tmp_path / "te", VOCAB)
  files = sorted(os.listdir(tmp_path / "te"))
  shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
  assert "model.safetensors.index.json" in files and len(shards) >= 2, files
  state_dict = folders.load_state_dict(tmp_path / "te")
  config = T5Config.from_dict(folders.read_config(tmp_path / "te"))
  params = t5_params_from_state_dict(state_dict, config)
  ids, mask = _prompts()
  assert np.max(np.abs(_encode(params, config, ids, mask) - _theirs(model, ids, mask))) <= 1e-5

  tiny_t5.make_tiny_t5_encoder(tmp_path / "fp16", VOCAB, variant="fp16")
  with pytest.raises(FolderError, match="variant='fp16'"):
    folders.load_state_dict(tmp_path / "fp16")
  half = folders.load_state_dict(tmp_path / "fp16", variant="fp16")
  assert half["shared.weight"].dtype == np.float16
  params16 = t5_params_from_state_dict(half, config)
  q = params16["block_1"]["self_attention"]["q"]["kernel"]
  assert q.dtype == np.float32
  np.testing.assert_array_equal(q, state_dict["encoder.block.1.layer.0.SelfAttention.q.weight"].astype(np.float16).T)


def test_missing_shard_is_named(tmp_path):
  tiny_t5.make_tiny_t5_encoder(tmp_path, VOCAB)
  with open(tmp_path / "model.safetensors.index.json") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(tmp_path / shard)
  with pytest.raises(FolderError) as e:
    folders.load_state_dict(tmp_path)
  assert shard in str(e.value) and "\n" not in str(e.value)


def test_conversion_names_bad_tensors():
  model = tiny_t5.random_t5_encoder(VOCAB)
  config, good = _config(model), _state_dict(model)
  wo = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  bad = dict(good, **{"encoder.block.0.layer.0.SelfAttention.extra.weight": np.zeros(3, np.float32)})
  del bad[wo]
  bad["encoder.final_layer_norm.weight"] = np.ones(5, np.float32)
  with pytest.raises(ConversionError) as e:
    t5_params_from_state_dict(bad, config)
  for name in (wo, "encoder.block.0.layer.0.SelfAttention.extra.weight", "encoder.final_layer_norm.weight: expected (32,)"):
    assert name in str(e.value), str(e.value)

  no_embedding = {k: v for k, v in good.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
  with pytest.raises(ConversionError, match="shared.weight or encoder.embed_tokens.weight"):
    t5_params_from_state_dict(no_embedding, config)
  differ = dict(good, **{"shared.weight": good["shared.weight"] + 1})
  with pytest.raises(ConversionError, match="two different token embeddings"):
    t5_params_from_state_dict(differ, config)
  # Either copy alone is enough; a seq2seq checkpoint's decoder and head are not the encoder's.
  only_copy = {k: v for k, v in good.items() if k != "shared.weight"}
  seq2seq = dict(good, **{"decoder.final_layer_norm.weight": np.ones(32, np.float32),
                          "lm_head.weight": good["shared.weight"]})
  for sd in (only_copy, seq2seq):
    np.testing.assert_array_equal(t5_params_from_state_dict(sd, config)["shared"]["embedding"], good["shared.weight"])
  # A relu checkpoint read with a gated config: wi_0 / wi_1 missing, wi unused.
  relu = _state_dict(tiny_t5.random_t5_encoder(VOCAB, feed_forward_proj="relu"))
  with pytest.raises(ConversionError, match=r"(?s)DenseReluDense\.wi_0\.weight.*DenseReluDense\.wi\.weight"):
    t5_params_from_state_dict(relu, config)


@pytest.mark.parametrize("config, key", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj"),
    (transformers.T5Config(feed_forward_proj="gated-silu").to_dict(), "feed_forward_proj"),  # with dense_act_fn "silu"
    (dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu"), "dense_act_fn"),
    (dict(feed_forward_proj="gelu"), "feed_forward_proj"),
])
def test_unsupported_config_is_refused(config, key):
  with pytest.raises(ConfigError) as e:
    T5Config.from_dict(config)
  message = str(e.value)
  assert message.startswith(f"T5 {key}=") and "'gated-gelu'" in message and "'relu'" in message, message
  assert "\n" not in message


def test_config_defaults_and_flags():
  assert T5Config.from_dict({}) == T5Config(feed_forward_proj="relu", is_gated_act=False, dense_act_fn="relu")
  v11 = T5Config.from_dict(dict(feed_forward_proj="gated-gelu", eos_token_id=[1], tie_word_embeddings=False))
  assert (v11.is_gated_act, v11.dense_act_fn, v11.eos_token_id) == (True, "gelu_new", 1)
  # Transformers lets explicit flags win over feed_forward_proj; so do we.
  assert T5Config.from_dict(dict(feed_forward_proj="relu", is_gated_act=True, dense_act_fn="gelu_new")).is_gated_act


def test_round_trip_and_transformers_loads_export(tmp_path):
  folder = tmp_path / "te"
  model = tiny_t5.make_tiny_t5_encoder(folder, VOCAB, max_shard_size="1GB")
  state_dict = safetensors.numpy.load_file(folder / "model.safetensors")
  assert "shared.weight" in state_dict and "encoder.embed_tokens.weight" not in state_dict  # Transformers 5 saves one
  config = _config(model)
  back = t5_state_dict_from_params(t5_params_from_state_dict(state_dict, config), config)
  assert set(back) == set(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  tied = t5_state_dict_from_params(t5_params_from_state_dict(state_dict, config), config, tied_copy=True)
  np.testing.assert_array_equal(tied["encoder.embed_tokens.weight"], state_dict["shared.weight"])

  folders.save_state_dict(tmp_path / "export", tied, model.config.to_dict(), weights_name="model.safetensors")
  loaded = transformers.T5EncoderModel.from_pretrained(tmp_path / "export").eval()
  ids, mask = _prompts()
  np.testing.assert_array_equal(_theirs(loaded, ids, mask), _theirs(model, ids, mask))


@pytest.mark.parametrize("layout", ["spiece", "tokenizer.json"])
def test_tokenizer(tmp_path, layout):
  tiny_t5.make_tiny_t5_tokenizer(tmp_path, layout=layout)
  expected = {"spiece": {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"},
              "tokenizer.json": {"tokenizer.json", "tokenizer_config.json"}}[layout]
  assert expected <= set(os.listdir(tmp_path))
  ours, auto = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)
  captions = list(tiny_t5.CAPTIONS)
  assert ours(captions).input_ids == auto(captions).input_ids
  words = sorted({w for c in captions for w in c.split()})
  for word, ids in zip(words, ours(words, add_special_tokens=False).input_ids):
    assert ids and 2 not in ids, (word, ours.convert_ids_to_tokens(ids))
  batch = ours(["a red circle", captions[0]], padding="max_length", max_length=24, truncation=True)
  short = batch.input_ids[0]
  n = sum(batch.attention_mask[0])
  assert short[n - 1] == 1 and set(short[n:]) == {0} and batch.attention_mask[0][n:] == [0] * (24 - n)
  assert batch.input_ids[1][sum(batch.attention_mask[1]) - 1] == 1


def test_tokenizer_folder_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "vocab.txt").write_text("")
  with pytest.raises(FolderError) as e:
    load_tokenizer(tmp_path / "empty")
  message = str(e.value)
  assert all(s in message for s in ("empty", "spiece.model", "tokenizer.json", "vocab.txt")) and "\n" not in message
  # Transformers 5's T5Tokenizer(vocab_file=...) ignores the file: every piece becomes <unk>. Refused.
  tiny_t5.make_tiny_t5_tokenizer(tmp_path / "good")
  transformers.T5TokenizerFast(vocab_file=str(tmp_path / "good" / "spiece.model")).save_pretrained(tmp_path / "broken")
  with pytest.raises(FolderError, match="<unk>"):
    load_tokenizer(tmp_path / "broken")


def test_init_draws_as_transformers():
  """Trained from nothing (the embedded PixArt teacher's encoder), our T5 starts where Transformers' does:
  per-weight standard deviations equal to `T5PreTrainedModel._init_weights`'s (the query's folds in the
  missing 1/sqrt(d_kv)), norms at one."""
  kwargs = dict(tiny_t5.TINY_ENCODER, d_model=64, d_kv=16, d_ff=256)
  config = T5Config(vocab_size=VOCAB, **kwargs)
  ours = nn.meta.unbox(T5Encoder(config).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
  torch.manual_seed(0)
  theirs = transformers.T5EncoderModel(transformers.T5Config(vocab_size=VOCAB, **kwargs))
  ours = t5_state_dict_from_params(ours, config)
  for name, value in _state_dict(theirs).items():
    if name == "encoder.embed_tokens.weight":
      continue  # tied to shared.weight
    expected, got = float(np.std(value)), float(np.std(ours[name]))
    if name.endswith("layer_norm.weight"):
      assert np.all(ours[name] == 1.0), name
    else:  # two samples' standard deviations: a tolerance of 4 standard errors of their ratio
      assert abs(got - expected) <= 4 * expected / np.sqrt(value.size), (name, got, expected)
