"""Attention behind one interface: "xla" (every backend), "cudnn" (GPU), "splash" (TPU Pallas), "chunked"
(XLA over blocks of queries, rematerialised: T x S scores never exist whole), and "auto", which picks the
fused kernel of the platform the program is built for (rrjax.hardware.platform) where it applies: splash on
TPU for self-attention over a multiple of 128 tokens, cuDNN on GPU in bf16/fp16, else xla.

A key is visible to a query when both are in the same non-zero segment and the key's slot index is not
after the query's (causal by slot, so left padding with explicit positions works unchanged).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rrjax import hardware

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "chunked")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
CHUNK_QUERIES = 512  # query block of "chunked"

_STAND_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("rrjax_attention_stand_in", default=False)


@contextlib.contextmanager
def gpu_kernel_stand_in():
  """Inside, attention that resolves to cuDNN is built as "chunked" instead: for ahead-of-time compiles of a
  GPU program on CPU devices (rrjax.preflight cpu:N), where cuDNN cannot be compiled. Chunked attention's
  scratch (one block of scores) is an upper bound on the fused kernel's; its inputs, outputs and the
  activations around it are the same, and it takes the [B, 1, T, S] bias that `_attend_cudnn` builds from
  the mask (cuDNN is given a dense mask), so that buffer is counted too."""
  token = _STAND_IN.set(True)
  try:
    yield
  finally:
    _STAND_IN.reset(token)


class Mask(NamedTuple):
  q_segment_BxT: jax.Array
  kv_segment_BxS: jax.Array
  q_index_T: jax.Array
  kv_index_S: jax.Array
  causal_only: bool  # True when q and kv are the same T slots (no cache): kernels may use causal masks

  def dense_BxTxS(self):
    same = self.q_segment_BxT[:, :, None] == self.kv_segment_BxS[:, None, :]
    valid = (self.kv_segment_BxS != 0)[:, None, :]
    causal = self.kv_index_S[None, None, :] <= self.q_index_T[None, :, None]
    return same & valid & causal


def kernel_for(impl: str, length: int, dtype, head_dim: int, causal_only: bool = True) -> str:
  """The kernel `impl` stands for on the target platform, for `length` query tokens of `dtype` ("auto"
  resolves; other names are returned as they are)."""
  if impl != "auto":
    return impl
  target = hardware.platform()
  if target == "tpu" and causal_only and length % 128 == 0:
    return "splash"
  if target == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0:
    return "cudnn"
  return "xla"


def resolve(impl: str, q_BxTxNxH, mask: Mask) -> str:
  """The kernel "auto" stands for here (other names are returned as they are)."""
  return kernel_for(impl, q_BxTxNxH.shape[1], q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], mask.causal_only)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, *, impl: str = "auto"):
  """Scaled dot-product attention with grouped kv heads; returns [B, T, N, H] in q's dtype."""
  impl = resolve(impl, q_BxTxNxH, mask)
  if impl == "cudnn" and _STAND_IN.get():
    bias_Bx1xTxS = jnp.where(mask.dense_BxTxS(), 0.0, _MASKED).astype(jnp.bfloat16)[:, None]
    return _attend_chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, bias_Bx1xTxS=bias_Bx1xTxS)
  if impl == "xla":
    return _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if impl == "chunked":
    return _attend_chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if impl == "cudnn":
    return _attend_cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if impl == "splash":
    if not mask.causal_only:  # decoding against a cache: tiny T, the XLA path is the right kernel
      return _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
    return _attend_splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  raise ValueError(f"attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, bias_Bx1xTxS=None):
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  if bias_Bx1xTxS is not None:  # 0 where visible, a large negative number elsewhere (cuDNN's form of the mask)
    scores = scores + bias_Bx1xTxS[:, :, None].astype(jnp.float32)
  else:
    scores = jnp.where(mask.dense_BxTxS()[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


def _attend_chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, block: int = CHUNK_QUERIES, bias_Bx1xTxS=None):
  """xla attention for one block of queries at a time, under a scan whose body is rematerialised: the
  backward pass recomputes each block's scores instead of keeping T x S of them."""
  B, T, N, H = q_BxTxNxH.shape
  if T <= block:
    return _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, bias_Bx1xTxS)
  nb = -(-T // block)
  pad = nb * block - T  # padded queries are segment 0: they see nothing real and are cut off below
  q_BxTpxNxH = jnp.pad(q_BxTxNxH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_BxTp = jnp.pad(mask.q_segment_BxT, ((0, 0), (0, pad)))
  idx_Tp = jnp.pad(mask.q_index_T, (0, pad), mode="edge")
  q_nxBxCxNxH = q_BxTpxNxH.reshape(B, nb, block, N, H).swapaxes(0, 1)
  seg_nxBxC = seg_BxTp.reshape(B, nb, block).swapaxes(0, 1)
  idx_nxC = idx_Tp.reshape(nb, block)
  bias_nxBx1xCxS = None
  if bias_Bx1xTxS is not None:
    S = bias_Bx1xTxS.shape[-1]
    bias_nxBx1xCxS = jnp.pad(bias_Bx1xTxS, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(
        B, 1, nb, block, S).transpose(2, 0, 1, 3, 4)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def one_block(_, xs):
    q_BxCxNxH, seg_BxC, idx_C, bias = xs
    block_mask = Mask(seg_BxC, mask.kv_segment_BxS, idx_C, mask.kv_index_S, mask.causal_only)
    return None, _attend_xla(q_BxCxNxH, k_BxSxKxH, v_BxSxKxH, block_mask, bias)

  _, out_nxBxCxNxH = jax.lax.scan(one_block, None, (q_nxBxCxNxH, seg_nxBxC, idx_nxC, bias_nxBx1xCxS))
  return out_nxBxCxNxH.swapaxes(0, 1).reshape(B, nb * block, N, H)[:, :T]


def _attend_cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask):
  # cuDNN's fused kernel needs bf16/fp16 inputs; it handles grouped kv heads itself.
  dtype = q_BxTxNxH.dtype
  if dtype == jnp.float32:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (x.astype(jnp.bfloat16) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  out = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask.dense_BxTxS()[:, None],
                                     implementation="cudnn")
  return out.astype(dtype)


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  masks = mask_lib.MultiHeadMask([mask_lib.CausalMask((q_len, kv_len)) for _ in range(num_heads)])
  block = min(512, q_len)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(masks, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _attend_splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask):
  from rrjax import sharding

  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  if T % 128:
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got {T}; "
                     "pad the batch or use attention='xla'")
  # kv heads repeated to N first, so q, k and v split over the same mesh axes.
  k_BxSxNxH = jnp.repeat(k_BxSxKxH, N // K, axis=2)
  v_BxSxNxH = jnp.repeat(v_BxSxKxH, N // K, axis=2)
  args = (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask.q_segment_BxT, mask.kv_segment_BxS)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash_local(*args)
  # A Pallas call is opaque to the SPMD partitioner (it would gather the whole batch onto every device):
  # run it per shard, over the batch and head axes of the logical rules.
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  heads = sharding.logical_spec(("batch", "length", "q_heads", "head_dim"), q_BxTxNxH.shape, sizes)
  rows = sharding.logical_spec(("batch", "length"), (B, T), sizes)
  kv_rows = jax.sharding.PartitionSpec(rows[0], None)
  kv_heads = jax.sharding.PartitionSpec(heads[0], None, *heads[2:])
  return jax.shard_map(_splash_local, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows, kv_rows),
                       out_specs=heads, check_vma=False)(*args)


def _splash_local(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, q_segment_BxT, kv_segment_BxS):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  B, T, N, H = q_BxTxNxH.shape
  # Off TPU the Pallas kernel runs in interpret mode, which is how it is tested on CPU; an ahead-of-time
  # build for a TPU topology (hardware.target_platform) gets the real kernel.
  kernel = _splash_kernel(N, T, k_BxSxNxH.shape[1], hardware.platform() != "tpu")
  q_BxNxTxH = (q_BxTxNxH * (H ** -0.5)).transpose(0, 2, 1, 3)
  k_BxNxSxH = k_BxSxNxH.transpose(0, 2, 1, 3)
  v_BxNxSxH = v_BxSxNxH.transpose(0, 2, 1, 3)
  # Padding (segment 0) only ever sees padding, so its rows are finite and ignored downstream.
  segments = splash.SegmentIds(q=q_segment_BxT, kv=kv_segment_BxS)
  out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, segment_ids=segments)
  return out_BxNxTxH.transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)
