"""Attention behind one interface: "xla" (every backend), "cudnn" (GPU), "splash" (TPU Pallas), and "auto",
which picks the fused kernel of the platform the program is built for (rrjax.hardware.platform) where it
applies: splash on TPU for self-attention over a multiple of 128 tokens, cuDNN on GPU in bf16/fp16, else xla.

A key is visible to a query when both are in the same non-zero segment and the key's slot index is not
after the query's (causal by slot, so left padding with explicit positions works unchanged).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rrjax import hardware

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


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


def resolve(impl: str, q_BxTxNxH, mask: Mask) -> str:
  """The kernel "auto" stands for here (other names are returned as they are)."""
  if impl != "auto":
    return impl
  target = hardware.platform()
  if target == "tpu" and mask.causal_only and q_BxTxNxH.shape[1] % 128 == 0:
    return "splash"
  if target == "gpu" and q_BxTxNxH.dtype in (jnp.bfloat16, jnp.float16) and q_BxTxNxH.shape[-1] % 8 == 0:
    return "cudnn"
  return "xla"


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, *, impl: str = "auto"):
  """Scaled dot-product attention with grouped kv heads; returns [B, T, N, H] in q's dtype."""
  impl = resolve(impl, q_BxTxNxH, mask)
  if impl == "xla":
    return _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if impl == "cudnn":
    return _attend_cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if impl == "splash":
    if not mask.causal_only:  # decoding against a cache: tiny T, the XLA path is the right kernel
      return _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
    return _attend_splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  raise ValueError(f"attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask):
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  scores = jnp.where(mask.dense_BxTxS()[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


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
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  if T % 128:
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got {T}; "
                     "pad the batch or use attention='xla'")
  # Off TPU the Pallas kernel runs in interpret mode, which is how it is tested on CPU.
  kernel = _splash_kernel(N, T, k_BxSxKxH.shape[1], jax.devices()[0].platform != "tpu")
  q_BxNxTxH = (q_BxTxNxH * (H ** -0.5)).transpose(0, 2, 1, 3)
  k_BxNxSxH = jnp.repeat(k_BxSxKxH, N // K, axis=2).transpose(0, 2, 1, 3)
  v_BxNxSxH = jnp.repeat(v_BxSxKxH, N // K, axis=2).transpose(0, 2, 1, 3)
  # Padding (segment 0) only ever sees padding, so its rows are finite and ignored downstream.
  segments = splash.SegmentIds(q=mask.q_segment_BxT, kv=mask.kv_segment_BxS)
  out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, segment_ids=segments)
  return out_BxNxTxH.transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)
