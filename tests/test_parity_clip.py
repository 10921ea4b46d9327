"""Our Flax CLIP text encoder equals Transformers' CLIPTextModel(WithProjection) on the same weights."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tdm_jax.convert.errors import ConversionError
from tdm_jax.convert.clip import (clip_params_from_state_dict,
                                  clip_state_dict_from_params)
from tdm_jax.models.clip import CLIPTextEncoder, ClipConfig

VOCAB, LENGTH = 99, 16
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=LENGTH, bos_token_id=VOCAB - 2,
            pad_token_id=1)

CASES = {
    # SD1.5-like: quick_gelu, the current EOS rule (first position equal to eos_token_id).
    # The end token is not the largest id here (bos is), so the two rules pick different tokens.
    "plain_quick_gelu": (transformers.CLIPTextModel, dict(eos_token_id=VOCAB - 3)),
    # SDXL bigG-like: exact gelu, with the text projection.
    "projection_gelu": (transformers.CLIPTextModelWithProjection,
                        dict(eos_token_id=VOCAB - 3, hidden_act="gelu", projection_dim=24)),
    # Legacy configs with eos_token_id == 2 pool at the largest token id.
    "legacy_eos_2": (transformers.CLIPTextModel, dict(eos_token_id=2)),
}


def _input_ids(eos, seed=0):
  """Random tokens after a start token (VOCAB - 2), an end token at a different position in each row.

  Rows pad after the end token either with the end token itself (as the ViT-L tokenizer does)
  or with 0 (as OpenCLIP's does).
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB - 3, size=(4, LENGTH)).astype(np.int32)
  ids[:, 0] = VOCAB - 2
  for row, (pos, pad) in enumerate([(3, eos), (7, 0), (LENGTH - 1, 0), (10, eos)]):
    ids[row, pos] = eos
    ids[row, pos + 1:] = pad
  return ids


def _save_tiny(tmp_path, case):
  cls, extra = CASES[case]
  torch.manual_seed(0)
  model = cls(transformers.CLIPTextConfig(**TINY, **extra)).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  with open(os.path.join(tmp_path, "config.json")) as f:
    config = ClipConfig.from_dict(json.load(f))
  state_dict = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  return model, config, state_dict


def _close(name, ours, theirs, errors):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  errors[name] = err
  assert err <= 1e-4 * max(1.0, float(np.max(np.abs(theirs)))), (name, err)


@pytest.mark.parametrize("case", list(CASES))
def test_parity(tmp_path, case):
  model, config, state_dict = _save_tiny(tmp_path, case)
  assert config.with_projection == (case == "projection_gelu")
  params = clip_params_from_state_dict(state_dict, config)
  # Legacy configs (eos_token_id 2) carry the real end token, the largest id, in their inputs.
  ids = _input_ids(VOCAB - 1 if config.eos_token_id == 2 else config.eos_token_id)

  with torch.no_grad():
    theirs = model(torch.from_numpy(ids).long(), output_hidden_states=True)
  ours = jax.jit(CLIPTextEncoder(config).apply)({"params": params}, jnp.asarray(ids))

  errors = {}
  _close("last_hidden_state", ours["last_hidden_state"], theirs.last_hidden_state, errors)
  assert len(ours["hidden_states"]) == len(theirs.hidden_states) == config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(ours["hidden_states"], theirs.hidden_states)):
    _close(f"hidden_states[{i}]", a, b, errors)
  _close("hidden_states[-2]", ours["hidden_states"][-2], theirs.hidden_states[-2], errors)
  if config.with_projection:
    # CLIPTextModelWithProjection returns the pooled state only through text_embeds.
    pooled = model.text_model(torch.from_numpy(ids).long()).pooler_output.detach()
    _close("pooled_output", ours["pooled_output"], pooled, errors)
    _close("text_embeds", ours["text_embeds"], theirs.text_embeds, errors)
  else:
    _close("pooled_output", ours["pooled_output"], theirs.pooler_output, errors)
    assert "text_embeds" not in ours
  print(case, {k: f"{v:.2e}" for k, v in errors.items()})

  # The reverse conversion gives back exactly the checkpoint.
  # Transformers 5 saves CLIPTextModel without the `text_model.` prefix; both forms read the same.
  bare = not any(k.startswith("text_model.") for k in state_dict)
  back = clip_state_dict_from_params(params, config, prefix=not bare)
  assert sorted(back) == sorted(state_dict)
  for k, v in back.items():
    np.testing.assert_array_equal(v, state_dict[k], err_msg=k)
  prefixed = clip_state_dict_from_params(params, config)
  assert all(k.startswith(("text_model.", "text_projection.")) for k in prefixed)
  again = clip_params_from_state_dict(
      dict(prefixed, **{"text_model.embeddings.position_ids": np.arange(LENGTH)[None]}), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_pooling_rule_differs_between_legacy_and_current():
  """With eos padding, 'first eos' and 'largest id' agree; with a larger id earlier they must not."""
  ids = np.array([[5, VOCAB - 1, 7, 3, 3]], np.int32)  # largest id at 1, token 3 first at 3.
  for eos, want in ((2, 1), (3, 3)):
    config = ClipConfig.from_dict({**TINY, "max_position_embeddings": 5, "eos_token_id": eos})
    model = CLIPTextEncoder(config)
    variables = model.init(jax.random.key(0), jnp.asarray(ids))
    out = model.apply(variables, jnp.asarray(ids))
    np.testing.assert_array_equal(out["pooled_output"], out["last_hidden_state"][:, want])


def test_logical_axes_on_every_parameter():
  config = ClipConfig.from_dict({**TINY, "projection_dim": 24}, with_projection=True)
  variables = jax.eval_shape(lambda: CLIPTextEncoder(config).init(
      jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32)))
  leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
                                     or hasattr(x, "names"))
  assert leaves and all(hasattr(leaf, "names") for leaf in leaves)
  q = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("embed", "heads")


@pytest.fixture(scope="module", params=["bare", "prefixed"])
def plain_checkpoint(tmp_path_factory, request):
  """The tiny CLIPTextModel checkpoint, as Transformers 5 saves it (bare) and as the Hub has it."""
  _, config, state_dict = _save_tiny(tmp_path_factory.mktemp("clip"), "plain_quick_gelu")
  if request.param == "prefixed":
    state_dict = {"text_model." + k: v for k, v in state_dict.items()}
  return config, state_dict, ("text_model." if request.param == "prefixed" else "")


def test_missing_tensor_is_named(plain_checkpoint):
  config, state_dict, prefix = plain_checkpoint
  name = prefix + "encoder.layers.1.mlp.fc2.bias"
  bad = {k: v for k, v in state_dict.items() if k != name}
  assert len(bad) == len(state_dict) - 1
  with pytest.raises(ConversionError, match="unfilled") as info:
    clip_params_from_state_dict(bad, config)
  assert name in str(info.value)


def test_extra_tensor_is_named(plain_checkpoint):
  config, state_dict, prefix = plain_checkpoint
  extra = prefix + "encoder.layers.2.mlp.fc1.weight"
  bad = dict(state_dict, **{extra: np.zeros((37, 32), np.float32),
                            "text_projection.weight": np.zeros((24, 32), np.float32)})
  with pytest.raises(ConversionError, match="unused") as info:
    clip_params_from_state_dict(bad, config)
  assert extra in str(info.value)
  assert "text_projection.weight" in str(info.value)


def test_wrong_shape_is_named(plain_checkpoint):
  config, state_dict, prefix = plain_checkpoint
  name = prefix + "encoder.layers.0.self_attn.q_proj.weight"
  bad = dict(state_dict, **{name: np.zeros((32, 31), np.float32)})
  with pytest.raises(ConversionError) as info:
    clip_params_from_state_dict(bad, config)
  assert f"{name}: expected (32, 32), got (32, 31)" in str(info.value)


def test_reverse_rejects_wrong_tree(plain_checkpoint):
  config, state_dict, _ = plain_checkpoint
  params = clip_params_from_state_dict(state_dict, config)
  del params["final_layer_norm"]["bias"]
  with pytest.raises(ConversionError, match="final_layer_norm/bias"):
    clip_state_dict_from_params(params, config)
