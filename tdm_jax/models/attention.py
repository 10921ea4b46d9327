"""Scaled dot-product attention behind one function, with a choice of implementation.

"xla": plain einsum + softmax (softmax in float32), runs everywhere and is what parity tests use. It
materialises the whole (batch, heads, q_length, kv_length) float32 logits.
"chunked": memory-efficient attention in plain XLA. Queries are processed `chunk_size` at a time
(`lax.map`), and keys/values `kv_chunk_size` at a time with an online (running max / running sum)
softmax when kv_length exceeds it; statistics and accumulation in float32. The working set of one step
is (batch, heads, chunk_size, kv_chunk_size), which keeps it in cache: on CPU this is 2-5x faster
than "xla" for 1024+ tokens. Each block step is rematerialised, so the backward pass keeps the
running statistics per block, never the stacked logits of every block (at SDXL's 4096 tokens,
batch 16, those would be 5 GiB per attention). Equal to "xla" up to float32 rounding, also for
masks and causal.
"dot_product_attention": `jax.nn.dot_product_attention`, left to choose its implementation, which in
JAX 0.10 is always its XLA path (its source: "defaults to XLA for now"), with the whole logits.
Sequences shorter than `min_fused_length` take the plain path, where a fused kernel gains nothing.
"splash": the Pallas TPU splash-attention kernel that ships with JAX
(`jax.experimental.pallas.ops.tpu.splash_attention`), for TPUs. (Named after the kernel, as
"dot_product_attention" is after its API; "pallas_tpu" would not say which of JAX's two Pallas TPU
attention kernels it is. Splash rather than the older `flash_attention` kernel: splash takes static
block-sparse masks, so causal skips whole blocks, as well as segment ids; its forward and VJP run in
Pallas interpret mode on CPU, where the tests check it.) q is multiplied by the REAL head_dim**-0.5
first (the kernel does not scale); head_dim is zero-padded to a multiple of 128 lanes (zero columns
of q and k leave the logits unchanged, those of v give output columns that are sliced off); q_length
and kv_length are padded to multiples of their block sizes (`splash_block_q`, `splash_block_kv`, at
most 512, lowered to the length rounded up to 128 for short sequences). Padded keys, and keys that a
key-padding mask drops, are masked through segment ids (queries in segment 1, kept keys 1, dropped
or padded keys 0); padded query rows are computed and sliced off. The kernel works on one example
(heads, length, head_dim), so it is vmapped over the batch, and under a mesh (`jax.set_mesh`) it
runs in `jax.shard_map`, the batch over the mesh's batch axes (`sharding.BATCH_AXES`, if they divide
it) and the heads over "tensor" (if it divides them): a Pallas call is a custom call on one device
that XLA's partitioner cannot split. It has its own VJP (dq and dkv kernels). What the kernel cannot
express takes the plain path, as the short sequences (q_length < `min_fused_length`) do: a mask that
is not a key-padding mask (not broadcastable to (batch, 1, 1, kv_length), e.g. a per-query pattern),
and causal attention with a mask or with q_length > kv_length (there a query row can have every key
masked, where the kernel's output is not the plain path's uniform average; a sample whose key-
padding mask drops every key is handled exactly, by attending with zeroed keys). `interpret=True`
runs the same kernel in Pallas interpret mode, on any backend (tests on CPU; slow).
"auto": decided at trace time by `jax.devices()[0].platform`: on GPU "dot_product_attention" while one
call's score matrix fits `SCORE_MATRIX_BUDGET_BYTES`, "chunked" above it (a video DiT's 17,776 tokens
would need 70 GiB there); on TPU "splash"; elsewhere "chunked" for q_length >= `min_fused_length` and
"xla" below it (short sequences gain nothing from chunking and pay for the loop).

`check_attention_fits` refuses, before anything compiles, a setting whose path holds the whole
(batch, heads, q_length, kv_length) float32 logits when that one matrix exceeds
`SCORE_MATRIX_BUDGET_BYTES`: "xla" always; "dot_product_attention" (and "auto" on GPU) too, because
`jax.nn.dot_product_attention` without `implementation=` runs JAX's XLA path (JAX 0.10's docstring:
"defaults to None, which currently falls back to xla"), which materialises the logits like "xla";
"splash" where it takes the plain path (see above). "chunked" never does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

from tdm_jax.infra.errors import ConfigError
from tdm_jax.infra.sharding import BATCH_AXES

IMPLEMENTATIONS = ("xla", "chunked", "dot_product_attention", "splash", "auto")
_LANES = 128  # TPU vector lanes: head_dim and the splash block sizes are multiples of it
# The largest full (batch, heads, q_length, kv_length) float32 score matrix per device that
# `check_attention_fits` lets a materialising path build. Attention and its gradient hold about three
# such matrices at once (logits, softmax weights, their cotangent: XLA:CPU's temporaries for
# the gradient of "xla" and of "dot_product_attention" at 4,096 tokens x 4 heads are 3.06x the
# 256 MiB matrix; "chunked" 0.15x), so the 4 GiB budget is about 12 GiB of a 16-80 GiB accelerator,
# beside weights, adapters and activations.
SCORE_MATRIX_BUDGET_BYTES = 4 * 2 ** 30
_FIXES = ('"chunked" (any platform)', '"splash" (TPU)')


def resolve_implementation(implementation: str, q_length: int, *, platform: str,
                           min_fused_length: int = 256, score_bytes: Optional[int] = None) -> str:
  """What `attention(..., implementation=implementation)` runs for `q_length` queries on `platform`
  ("cpu", "gpu", "tpu"): the kernel, or "xla" for the plain path (full logits). `score_bytes`: one call's
  full score matrix (`score_matrix_bytes`), which sends "auto" on GPU to "chunked" above the budget. A
  masked or causal call to "splash" may still take the plain path (see `check_attention_fits`)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  long_enough = q_length >= min_fused_length
  if implementation == "auto":
    too_big = score_bytes is not None and score_bytes > SCORE_MATRIX_BUDGET_BYTES
    gpu = "chunked" if too_big else "dot_product_attention"
    implementation = {"gpu": gpu, "tpu": "splash"}.get(platform, "chunked" if long_enough else "xla")
  if implementation in ("splash", "dot_product_attention") and not long_enough:
    return "xla"
  return implementation


def score_matrix_bytes(q_length: int, kv_length: int, heads: int, batch: int, dtype_bytes: int = 4) -> int:
  """Bytes of one full (batch, heads, q_length, kv_length) score matrix (the plain path's float32 logits)."""
  return int(batch) * int(heads) * int(q_length) * int(kv_length) * int(dtype_bytes)


def check_attention_fits(q_length: int, kv_length: int, heads: int, batch_per_device: int, implementation: str,
                         *, platform: Optional[str] = None, mask: Optional[str] = None, causal: bool = False,
                         min_fused_length: int = 256, dtype_bytes: int = 4,
                         budget_bytes: int = SCORE_MATRIX_BUDGET_BYTES, setting: str = "model.attention") -> None:
  """Raises `ConfigError` (one line: the setting, the tokens, the bytes, the fix) when `implementation`
  on `platform` (default: `jax.default_backend()`) would hold the whole (batch_per_device, heads, q_length,
  kv_length) score matrix and that matrix is over `budget_bytes`. Pure arithmetic: call it before compiling.

  Materialising paths: "xla" always; "dot_product_attention" always (JAX's XLA path; also "auto" on GPU,
  which resolves to it); "splash" and "dot_product_attention" below `min_fused_length` (the plain path);
  "splash" with a `mask` that is not a key-padding one (mask="other"), causal with any mask, or causal
  with q_length > kv_length. `mask`: None, "key_padding" ((batch, kv_length) keep-mask) or "other".
  `heads`: the heads one device computes (all of them unless the attention's heads are split over
  "tensor"). `batch_per_device`: the rows one device's attention call sees (a guided teacher pass runs
  the conditional and unconditional halves as one batch: twice the per-device batch).
  """
  if mask not in (None, "key_padding", "other"):
    raise ValueError(f"mask={mask!r}: expected None, 'key_padding' or 'other'")
  platform = platform or jax.default_backend()
  size = score_matrix_bytes(q_length, kv_length, heads, batch_per_device, dtype_bytes)
  resolved = resolve_implementation(implementation, q_length, platform=platform, min_fused_length=min_fused_length,
                                    score_bytes=size)
  if resolved == "splash":
    plain = mask == "other" or (causal and (mask is not None or q_length > kv_length))
  else:
    plain = resolved in ("xla", "dot_product_attention")
  if not plain or size <= budget_bytes:
    return
  via = "" if resolved == implementation else f" (resolved to {resolved!r} on {platform})"
  raise ConfigError(
      f"{setting}={implementation!r}{via} would hold the full attention score matrix: {q_length:,} x "
      f"{kv_length:,} tokens x {heads} heads x batch {batch_per_device} per device = {size / 2 ** 30:.1f} GiB "
      f"(> {budget_bytes / 2 ** 30:g} GiB budget); set {setting} to " + " or ".join(_FIXES) +
      ", which never build it, or lower the tokens (model.height / width / num_frames) or the batch")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
              causal: bool = False, implementation: str = "auto", min_fused_length: int = 256,
              chunk_size: int = 256, kv_chunk_size: int = 1024, splash_block_q: int = 512,
              splash_block_kv: int = 512, interpret: bool = False) -> jax.Array:
  """Multi-head attention over (batch, length, heads, head_dim) inputs.

  mask: boolean, broadcastable to (batch, heads, q_length, kv_length); True means attend. A query
  row with every key masked attends uniformly to all keys (as in the plain path).
  causal: query i attends to keys j <= i + kv_length - q_length (bottom-right aligned).
  chunk_size, kv_chunk_size: query and key block lengths of "chunked" (and of "auto" on CPU).
  splash_block_q, splash_block_kv: largest query and key block lengths of "splash" (and of "auto" on
    TPU), multiples of 128.
  interpret: run the "splash" kernel in Pallas interpret mode (any backend; for tests).
  Returns (batch, q_length, heads, head_dim) in v's dtype.
  """
  long_enough = q.shape[1] >= min_fused_length
  implementation = resolve_implementation(
      implementation, q.shape[1], platform=jax.devices()[0].platform, min_fused_length=min_fused_length,
      score_bytes=score_matrix_bytes(q.shape[1], k.shape[1], q.shape[2], q.shape[0]))
  if implementation == "splash" and long_enough:
    out = _splash(q, k, v, mask, causal, splash_block_q, splash_block_kv, interpret)
    if out is not None:
      return out
  if implementation == "dot_product_attention" and long_enough:
    q_len, kv_len = q.shape[1], k.shape[1]
    if causal and q_len != kv_len:  # is_causal aligns top-left; ours (and the plain path) bottom-right
      tri = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
      mask = tri if mask is None else jnp.logical_and(mask, tri)
      causal = False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  if implementation == "chunked":
    return _chunked(q, k, v, mask, causal, chunk_size, kv_chunk_size)
  return _plain(q, k, v, mask, causal)


def _plain(q, k, v, mask, causal):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    q_len, kv_len = q.shape[1], k.shape[1]
    tri = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    mask = tri if mask is None else jnp.logical_and(mask, tri)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _round_up(n, multiple):
  return -(-n // multiple) * multiple


def _key_padding(mask, batch, kv_len):
  """The (batch, kv_len) keep-mask of a key-padding `mask`; None if `mask` varies over heads or queries."""
  mask = jnp.asarray(mask, bool)
  if mask.ndim > 4:
    return None
  shape = (1,) * (4 - mask.ndim) + mask.shape
  if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch) or shape[3] not in (1, kv_len):
    return None
  return jnp.broadcast_to(mask.reshape(shape[0], shape[3]), (batch, kv_len))


def _shard_axes(batch, heads):
  """Mesh axes of the current mesh (not already manual) that the splash call is shard_mapped over:
  (batch axes, heads axis), each () / None where absent, of size 1, or not dividing the dimension."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), None
  usable = {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
            if kind != AxisType.Manual and size > 1}
  batch_axes = tuple(a for a in BATCH_AXES if a in usable)
  if batch % int(np.prod([usable[a] for a in batch_axes])):
    batch_axes = ()  # the kernel then runs on the whole batch (replicated): correct, but no split
  head_axis = "tensor" if "tensor" in usable and heads % usable["tensor"] == 0 else None
  return batch_axes, head_axis


def _splash(q, k, v, mask, causal, block_q, block_kv, interpret):
  """The splash kernel's attention, or None where it does not apply (the caller takes the plain path)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  for name, size in (("splash_block_q", block_q), ("splash_block_kv", block_kv)):
    if size <= 0 or size % _LANES:
      raise ValueError(f"{name}={size} must be a positive multiple of {_LANES}")
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  out_dtype = v.dtype
  keep = None
  if mask is not None:
    keep = _key_padding(mask, batch, kv_len)
    if keep is None:
      return None  # a per-head or per-query mask: the kernel would need it as a (dynamic) dense mask
    if causal:
      return None  # causal with dropped keys can leave a query row no key (see the module docstring)
  if causal and q_len > kv_len:
    return None  # the first q_len - kv_len query rows have no key at all

  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  # The kernel does not scale the logits: scale by the real head_dim, before padding it.
  q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(dtype)
  k, v = k.astype(dtype), v.astype(dtype)
  if keep is not None:
    # A sample that drops every key: the plain path gives every key the same logit (uniform average
    # of v, zero gradient for q and k); zero keys, all kept, give the same.
    any_kept = keep.any(axis=-1)
    k = jnp.where(any_kept[:, None, None, None], k, jnp.zeros((), dtype))
    keep = jnp.logical_or(keep, ~any_kept[:, None])

  bq = min(block_q, _round_up(q_len, _LANES))
  bkv = min(block_kv, _round_up(kv_len, _LANES))
  q_pad, kv_pad, d_pad = _round_up(q_len, bq), _round_up(kv_len, bkv), _round_up(head_dim, _LANES)

  def to_kernel(x, length):  # (batch, length, heads, head_dim) -> (batch, heads, padded, d_pad)
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
    return jnp.swapaxes(x, 1, 2)

  args = [to_kernel(q, q_pad), to_kernel(k, kv_pad), to_kernel(v, kv_pad)]
  if keep is None and kv_pad > kv_len:
    keep = jnp.ones((batch, kv_len), bool)
  if keep is not None:  # kv segment ids: 1 for kept keys, 0 for dropped and padded ones
    args.append(jnp.pad(keep.astype(jnp.int32), ((0, 0), (0, kv_pad - kv_len))))
  # Padded query rows (sliced off below) attend like real ones; causal stays bottom-right aligned on
  # the real lengths, and padded keys are masked by their segment.
  head_mask = (sm.CausalMask((q_pad, kv_pad), offset=kv_len - q_len) if causal
               else sm.FullMask((q_pad, kv_pad)))
  block_sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)

  def run(q, k, v, *kv_segment):
    """The kernel on (a shard of) the batch: (batch, heads, q_pad, d_pad)."""
    kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * q.shape[1]), block_sizes=block_sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    if not kv_segment:
      return jax.vmap(kernel)(q, k, v)
    one = lambda q, k, v, q_seg, kv_seg: kernel(q, k, v, segment_ids=sk.SegmentIds(q_seg, kv_seg))
    return jax.vmap(one, in_axes=(0, 0, 0, None, 0))(q, k, v, jnp.ones((q_pad,), jnp.int32), *kv_segment)

  batch_axes, head_axis = _shard_axes(batch, heads)
  if batch_axes or head_axis:
    # A Pallas call is a custom call on one device that XLA's partitioner cannot split (it would
    # gather the whole batch on every device): run it per shard, batch over the batch axes and
    # heads over "tensor". check_vma=False: the kernel's pallas_call declares its outputs without
    # the varying-manual-axes types that shard_map's check would ask for.
    qkv_spec = P(batch_axes or None, head_axis)
    in_specs = (qkv_spec,) * 3 + ((P(batch_axes or None),) if len(args) == 4 else ())
    run = jax.shard_map(run, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
  out = run(*args)[:, :, :q_len, :head_dim]
  return jnp.swapaxes(out, 1, 2).astype(out_dtype)


def _blocks(x, axis, n, size):
  """Pads `axis` of x to n * size and moves the n blocks to a new leading axis."""
  pad = n * size - x.shape[axis]
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _chunked(q, k, v, mask, causal, chunk_size, kv_chunk_size):
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  out_dtype = jnp.result_type(v.dtype, v.dtype)
  scale = head_dim ** -0.5
  neg = jnp.finfo(jnp.float32).min
  # (batch, heads, length, head_dim): the layout XLA CPU runs the two matmuls fastest in.
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  qc = min(chunk_size, q_len)
  kc = min(kv_chunk_size, kv_len)
  nq, nk = -(-q_len // qc), -(-kv_len // kc)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))

  def logits_of(qb, kb, q_start, k_start, mb):
    """Scaled, masked float32 logits of one (query block, key block)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    allowed = mb
    if causal:
      q_idx = q_start + jnp.arange(qc)[:, None]
      k_idx = k_start + jnp.arange(kc)[None, :]
      tri = k_idx <= q_idx + (kv_len - q_len)
      allowed = tri if allowed is None else jnp.logical_and(allowed, tri)
    if allowed is not None:
      logits = jnp.where(allowed, logits, neg)
    return logits

  if nk == 1:
    @jax.checkpoint
    def one_query_block(args):
      qi, qb, mb = args
      logits = logits_of(qb, k, qi * qc, 0, mb)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      return jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  else:
    k_blocks, v_blocks = _blocks(k, 2, nk, kc), _blocks(v, 2, nk, kc)
    k_valid = (jnp.arange(nk * kc) < kv_len).reshape(nk, kc)

    def one_query_block(args):
      qi, qb, mb = args
      m_blocks = None if mb is None else _blocks(mb, 3, nk, kc)

      @jax.checkpoint
      def step(carry, xs):
        run_max, run_sum, acc = carry
        ki, kb, vb, valid, mbk = xs
        logits = logits_of(qb, kb, qi * qc, ki * kc, mbk)
        logits = jnp.where(valid, logits, -jnp.inf)  # padding keys: weight exactly 0
        new_max = jnp.maximum(run_max, lax.stop_gradient(logits.max(-1, keepdims=True)))
        p = jnp.exp(logits - new_max)
        correction = jnp.exp(run_max - new_max)
        run_sum = run_sum * correction + p.sum(-1, keepdims=True)
        acc = acc * correction + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vb,
                                            preferred_element_type=jnp.float32)
        return (new_max, run_sum, acc), None

      init = (jnp.full((batch, heads, qc, 1), -jnp.inf, jnp.float32),
              jnp.zeros((batch, heads, qc, 1), jnp.float32),
              jnp.zeros((batch, heads, qc, head_dim), jnp.float32))
      (_, run_sum, acc), _ = lax.scan(step, init, (jnp.arange(nk), k_blocks, v_blocks, k_valid, m_blocks))
      return acc / run_sum

  q_blocks = _blocks(q, 2, nq, qc)
  m_blocks = None if mask is None else _blocks(mask, 2, nq, qc)
  if nq == 1:
    out = one_query_block((0, q_blocks[0], None if mask is None else m_blocks[0]))[None]
  else:
    out = lax.map(one_query_block, (jnp.arange(nq), q_blocks, m_blocks))
  out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, nq * qc, head_dim)[:, :, :q_len]
  return jnp.swapaxes(out, 1, 2).astype(out_dtype)
