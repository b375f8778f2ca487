"""Attention behind one interface: "xla" (every backend), "cudnn" (GPU), "splash" (TPU Pallas), "chunked"
(XLA over blocks of queries, rematerialised: T x S scores never exist whole), and "auto", which picks the
fused kernel of the platform the program is built for (rrjax.hardware.platform) where it applies: splash on
TPU for self-attention over a multiple of 128 tokens, cuDNN on GPU in bf16/fp16, else xla.

A key is visible to a query when both are in the same non-zero segment and the key's slot index is not
after the query's (causal by slot, so left padding with explicit positions works unchanged).

Decode slots (`attend_slots`): each row of a right-padded cache holds its keys at positions [0, length);
the T new queries of a row are its last T positions (bottom-right causal). Only live keys are read where
the kernel allows it: cuDNN with `key_value_seq_lengths` (no dense mask) on GPU, the ragged paged Pallas
kernel on TPU (the contiguous cache viewed as pages), plain XLA with a length mask elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rrjax import hardware
from rrjax import sharding as sharding_lib

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "chunked")
SLOT_KERNELS = ("xla", "cudnn", "ragged")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
CHUNK_QUERIES = 512  # query block of "chunked"

STAND_IN_SCOPE = "cudnn_stand_in"  # rrjax.cost reads it off the compiled ops' metadata
_STAND_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("rrjax_attention_stand_in", default=False)


@contextlib.contextmanager
def gpu_kernel_stand_in():
  """Inside, attention that resolves to cuDNN is built as "chunked" instead: for ahead-of-time compiles of a
  GPU program on CPU devices (rrjax.preflight cpu:N), where cuDNN cannot be compiled. Chunked attention's
  scratch (one block of scores) is an upper bound on the fused kernel's; its inputs, outputs and the
  activations around it are the same, and where `_attend_cudnn` gives cuDNN a dense mask (anything but
  right-padded self-attention, which takes lengths) it takes the same [B, 1, T, S] bias, so that buffer is
  counted too. One-token decode over a slot cache is built with XLA (see `slot_kernel`)."""
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
  # Right padding, one segment per row (segment 1 on [0, length), 0 after): cuDNN takes lengths, no mask.
  lengths_B: jax.Array | None = None

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
    # The scope names the stand-in's ops in the compiled HLO, so that rrjax.cost counts cuDNN's causal work
    # instead of the full blocks the stand-in computes.
    with jax.named_scope(f"{STAND_IN_SCOPE}_T{q_BxTxNxH.shape[1]}_S{k_BxSxKxH.shape[1]}"):
      bias_Bx1xTxS = None
      if not _cudnn_takes_lengths(mask):
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


CAUSAL_BLOCK = 512  # long causal self-attention on XLA: query blocks that skip the keys after them


def _causal_blocks(T: int) -> int:
  blocks = min(8, T // CAUSAL_BLOCK)
  return blocks if blocks >= 2 and T % blocks == 0 else 1


def xla_score_elements(T: int, S: int, causal_only: bool) -> int:
  """Score elements per row and head that the XLA path holds at once (a few causal blocks in flight, for
  memory estimates)."""
  blocks = _causal_blocks(T) if causal_only else 1
  return T * S if blocks == 1 else 2 * (T // blocks) * S


def _attend_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, bias_Bx1xTxS=None):
  T = q_BxTxNxH.shape[1]
  blocks = _causal_blocks(T)
  if bias_Bx1xTxS is not None:  # 0 where visible, a large negative number elsewhere (cuDNN's form of the mask)
    return _attend_dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, None, bias_Bx1xTxS)
  if mask.causal_only and T == k_BxSxKxH.shape[1] and hardware.platform() == "cpu":
    return _attend_causal_cpu(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if not mask.causal_only or blocks == 1:
    return _attend_dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.dense_BxTxS())
  # Causal self-attention: query block [a, b) sees no key at or after b, so it reads only keys [0, b) (about
  # half the score work and a fraction of the score memory; the same result).
  size = T // blocks
  visible_BxTxS = mask.dense_BxTxS()
  outs = []
  for i in range(blocks):
    a, b = i * size, (i + 1) * size
    outs.append(_attend_dense(q_BxTxNxH[:, a:b], k_BxSxKxH[:, :b], v_BxSxKxH[:, :b], visible_BxTxS[:, a:b, :b]))
  return jnp.concatenate(outs, axis=1)


CPU_CAUSAL_BLOCKS, CPU_CAUSAL_QUERIES = 8, 32


def _attend_causal_cpu(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask):
  """Causal self-attention on XLA:CPU (prefill, forward and training): up to 8 causal blocks that read only
  the keys before their end, each mapped over 32-query pieces. XLA:CPU maps a fresh buffer for every large
  temporary on every call, and page faults on T x S scores cost several times the arithmetic (the 2-layer
  tiny model on 8 x 512 tokens: 88 ms with whole scores, 21 ms this way; one layer of Qwen2.5-0.5B's 14 heads
  on 4 x 1024 tokens: 378 ms forward and 1090 ms with gradients against 104 and 550); pieces this small stay in
  cache and need no fresh pages.
  Queries, keys and values are laid out head-major once, outside the loops, so that no piece transposes the
  key prefix again, and each piece divides its [C, H] output by the softmax sum instead of its [C, E]
  probabilities."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  blocks = max(1, min(CPU_CAUSAL_BLOCKS, T // (2 * CPU_CAUSAL_QUERIES)))
  while T % blocks:
    blocks -= 1
  size = T // blocks
  piece = CPU_CAUSAL_QUERIES if size % CPU_CAUSAL_QUERIES == 0 else size
  n = size // piece
  q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4) * (H ** -0.5)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  outs = []
  for i in range(blocks):
    start, end = i * size, (i + 1) * size
    kv_segment_BxE, kv_index_E = mask.kv_segment_BxS[:, :end], mask.kv_index_S[:end]
    q_nxBxKxGxCxH = q_BxKxGxTxH[:, :, :, start:end].reshape(B, K, N // K, n, piece, H).transpose(3, 0, 1, 2, 4, 5)
    segment_nxBxC = mask.q_segment_BxT[:, start:end].reshape(B, n, piece).swapaxes(0, 1)
    index_nxC = mask.q_index_T[start:end].reshape(n, piece)

    def one(xs, k_BxKxExH=k_BxKxSxH[:, :, :end], v_BxKxExH=v_BxKxSxH[:, :, :end], kv_segment_BxE=kv_segment_BxE,
            kv_index_E=kv_index_E):
      q_BxKxGxCxH, segment_BxC, index_C = xs
      visible_BxCxE = Mask(segment_BxC, kv_segment_BxE, index_C, kv_index_E, True).dense_BxTxS()
      scores = jnp.einsum("bkgch,bkeh->bkgce", q_BxKxGxCxH, k_BxKxExH, preferred_element_type=jnp.float32)
      scores = jnp.where(visible_BxCxE[:, None, None], scores, _MASKED)
      e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
      out = jnp.einsum("bkgce,bkeh->bkgch", e.astype(v_BxKxExH.dtype), v_BxKxExH, preferred_element_type=jnp.float32)
      return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v_BxKxExH.dtype)

    out_nxBxKxGxCxH = jax.lax.map(one, (q_nxBxKxGxCxH, segment_nxBxC, index_nxC))
    outs.append(out_nxBxKxGxCxH.transpose(1, 0, 4, 2, 3, 5).reshape(B, size, N, H))
  return jnp.concatenate(outs, axis=1)


def _attend_dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, visible_BxTxS, bias_Bx1xTxS=None):
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  if bias_Bx1xTxS is not None:
    scores = scores + bias_Bx1xTxS[:, :, None].astype(jnp.float32)
  else:
    scores = jnp.where(visible_BxTxS[:, None, None], scores, _MASKED)
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


def _cudnn_takes_lengths(mask: Mask) -> bool:
  """Right-padded self-attention goes to cuDNN as lengths; anything else as a dense mask."""
  return mask.lengths_B is not None and mask.causal_only


def _attend_cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: Mask):
  # cuDNN's fused kernel needs bf16/fp16 inputs; it handles grouped kv heads itself.
  dtype = q_BxTxNxH.dtype
  if dtype == jnp.float32:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (x.astype(jnp.bfloat16) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  if _cudnn_takes_lengths(mask):
    # Right-padded self-attention: top-left causal is right here (T == S), and lengths skip the padding.
    lengths_B = mask.lengths_B.astype(jnp.int32)
    out = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True,
                                       query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                       implementation="cudnn")
  else:
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
  T = q_BxTxNxH.shape[1]
  if T % 128:
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got {T}; "
                     "pad the batch or use attention='xla'")
  segments = (mask.q_segment_BxT, mask.kv_segment_BxS)
  return _per_device(_splash_local, (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segments),
                     (("batch", None, "q_heads", None), ("batch", None, "kv_heads", None),
                      ("batch", None, "kv_heads", None), (("batch", None), ("batch", None))),
                     ("batch", None, "q_heads", None))


def _splash_local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segments):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  # Off TPU the Pallas kernel runs in interpret mode, which is how it is tested on CPU; a program built for
  # TPU ahead of time (hardware.target_platform) gets the real kernel, so that Mosaic lowers it.
  kernel = _splash_kernel(N, T, k_BxSxKxH.shape[1], hardware.platform() != "tpu")
  q_BxNxTxH = (q_BxTxNxH * (H ** -0.5)).transpose(0, 2, 1, 3)
  k_BxNxSxH = jnp.repeat(k_BxSxKxH, N // K, axis=2).transpose(0, 2, 1, 3)
  v_BxNxSxH = jnp.repeat(v_BxSxKxH, N // K, axis=2).transpose(0, 2, 1, 3)
  # Padding (segment 0) only ever sees padding, so its rows are finite and ignored downstream.
  out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, segment_ids=splash.SegmentIds(*segments))
  return out_BxNxTxH.transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)


def _per_device(fn, args, arg_axes, out_axes):
  """fn(*args) on each device's shard where a mesh is active (Pallas kernels cannot be partitioned by XLA):
  the logical axes of each argument map to mesh axes; q and kv heads shard only together (whole groups)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  sizes = sharding_lib.mesh_sizes(mesh)
  q, k = args[0], args[1]
  tensor = sizes.get("tensor", 1)
  heads_split = tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0
  batch = sharding_lib.logical_spec(("batch",), (q.shape[0],), sizes)[0]
  P = jax.sharding.PartitionSpec

  def spec(axes):
    return P(*(batch if a == "batch" else ("tensor" if heads_split else None) if a in ("q_heads", "kv_heads")
               else None for a in axes))

  specs = jax.tree.map(spec, arg_axes, is_leaf=lambda x: isinstance(x, tuple) and all(
      isinstance(a, (str, type(None))) for a in x))
  return jax.shard_map(fn, in_specs=specs, out_specs=spec(out_axes), check_vma=False)(*args)


# ---------------------------------------------------------------- decode slots (right-padded caches)


def _ragged_fits(num_heads: int, num_kv_heads: int, head_dim: int, dtype) -> bool:
  """Whether the TPU ragged paged kernel takes these (per-device) head counts and width."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

  if head_dim % 128 or num_heads % num_kv_heads:
    return False
  try:
    rpa.get_min_heads_per_blk(num_heads, 2 * num_kv_heads, jnp.dtype(dtype), jnp.dtype(dtype))
  except (ValueError, AssertionError):
    return False
  return True


def slot_kernel(impl: str, *, dtype, num_heads: int, num_kv_heads: int, head_dim: int, query_len: int = 1,
                tensor: int = 1) -> str:
  """The kernel for queries appended to a slot cache ("xla", "cudnn" or "ragged"), for the platform programs
  are built for: the ragged paged Pallas kernel on TPU ("auto" or "splash", where its tiling takes the
  per-device heads: `tensor` shards them), cuDNN on GPU for one-token decode ("auto" in bf16/fp16, or
  "cudnn"), else XLA."""
  target = hardware.platform()
  heads, kv_heads = num_heads, num_kv_heads
  if tensor > 1 and num_kv_heads % tensor == 0:
    heads, kv_heads = num_heads // tensor, num_kv_heads // tensor
  if impl in ("auto", "splash") and target == "tpu" and _ragged_fits(heads, kv_heads, head_dim, dtype):
    return "ragged"
  # Under gpu_kernel_stand_in (compiling a GPU program on CPU) one-token decode is built with XLA, whose
  # scores are one row per head: the same cache reads, no larger scratch than the fused kernel's.
  if target == "gpu" and not _STAND_IN.get() and query_len == 1 and head_dim % 8 == 0 and (
      impl == "cudnn" or (impl == "auto" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))):
    return "cudnn"
  return "xla"


def slot_layout(kernel: str) -> str:
  """"paged" (keys and values interleaved per kv head, [L, B, S, 2K, H], the ragged kernel's page layout)
  for the TPU kernel, "split" (k and v, [L, B, S, K, H]) otherwise."""
  return "paged" if kernel == "ragged" else "split"


def _layer_kv(cache_k, cache_v, layer, keys: int | None = None):
  """One layer's keys and values [B, S, K, H] of a split or paged cache (its first `keys` positions: S)."""
  _, B, S, C, H = cache_k.shape
  take = lambda x: jax.lax.dynamic_slice(x, (layer, 0, 0, 0, 0), (1, B, keys or S, C, H))[0]
  if cache_v is not None:
    return take(cache_k), take(cache_v)
  kv_BxSx2KxH = take(cache_k)
  return kv_BxSx2KxH[:, :, 0::2], kv_BxSx2KxH[:, :, 1::2]


def attend_slots(q_BxTxNxH, cache_k, cache_v, layer, kv_lengths_B, *, kernel: str = "xla", keys: int | None = None):
  """Attention of each row's T new queries (its last T positions, already written to the cache) to that
  row's live keys [0, kv_lengths_B). `cache_k`/`cache_v` hold every layer ([L, B, S, K, H]; paged layout:
  cache_k is [L, B, S, 2K, H] and cache_v None); `layer` may be traced; `keys` (static, >= every row's
  length) bounds the positions XLA reads. Returns [B, T, N, H] in q's dtype."""
  B, T, N, H = q_BxTxNxH.shape
  if kernel == "ragged":
    return _attend_ragged(q_BxTxNxH, cache_k, layer, kv_lengths_B)
  k_BxSxKxH, v_BxSxKxH = _layer_kv(cache_k, cache_v, layer, keys)
  if kernel == "cudnn" and T == 1:
    dtype = q_BxTxNxH.dtype
    q, k, v = q_BxTxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype)
    if dtype == jnp.float32:
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    # Lengths only: cuDNN's is_causal is top-left aligned, wrong for one query against a longer cache.
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths_B.astype(jnp.int32),
                                       implementation="cudnn")
    return out.astype(dtype)
  S = k_BxSxKxH.shape[1]
  last_BxT = kv_lengths_B[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None]  # each query's own position
  visible_BxTxS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= last_BxT[:, :, None]
  dtype = q_BxTxNxH.dtype
  return _attend_dense(q_BxTxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype), visible_BxTxS)


def page_size(length: int) -> int:
  """The page size the ragged kernel views a slot of `length` positions in (a divisor of it)."""
  for size in (128, 64, 32, 16, 8):
    if length % size == 0:
      return size
  raise ValueError(f"slot length {length} is not a multiple of 8, as the paged layout needs")


def _attend_ragged(q_BxTxNxH, cache_k, layer, kv_lengths_B, reference: bool = False):
  """The TPU ragged paged kernel over the whole paged cache: slot b of layer l is pages
  [(l * B + b) * S / p, ...), so no layer is sliced (copied) out; sharded per device on a mesh."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

  def local(q_BxTxNxH, kv_LxBxSx2KxH, layer, kv_lengths_B):
    B, T, N, H = q_BxTxNxH.shape
    L, _, S, C, _ = kv_LxBxSx2KxH.shape
    size = page_size(S)
    per_slot = S // size
    pages = kv_LxBxSx2KxH.reshape(L * B * per_slot, size, C, H)
    first_B = (layer * B + jnp.arange(B, dtype=jnp.int32)) * per_slot
    page_indices_BxP = (first_B[:, None] + jnp.arange(per_slot, dtype=jnp.int32)[None]).astype(jnp.int32)
    cu_q_lens = (jnp.arange(B + 1, dtype=jnp.int32) * T).astype(jnp.int32)
    num_seqs = jnp.full((1,), B, jnp.int32)
    q = q_BxTxNxH.reshape(B * T, N, H).astype(kv_LxBxSx2KxH.dtype)
    kv_lengths_B = kv_lengths_B.astype(jnp.int32)
    if reference:  # the kernel's own pure-jnp reference, for CPU tests of this layout
      out = rpa.ref_ragged_paged_attention(q, pages, kv_lengths_B, page_indices_BxP, cu_q_lens, num_seqs,
                                           sm_scale=H ** -0.5)
    else:
      # Block sizes are passed: the tuned table needs a TPU device, absent in ahead-of-time builds.
      out = rpa.ragged_paged_attention(q, pages, kv_lengths_B, page_indices_BxP, cu_q_lens, num_seqs,
                                       sm_scale=H ** -0.5, num_kv_pages_per_block=min(per_slot, max(1, 512 // size)),
                                       num_queries_per_block=min(B * T, 32))
    return out.reshape(B, T, N, H).astype(q_BxTxNxH.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BxTxNxH, cache_k, layer, kv_lengths_B)
  sizes = sharding_lib.mesh_sizes(mesh)
  B, T, N, H = q_BxTxNxH.shape
  L, _, S, C, _ = cache_k.shape
  batch = sharding_lib.logical_spec(("batch",), (B,), sizes)[0]
  tensor = sizes.get("tensor", 1)
  heads = "tensor" if tensor > 1 and (C // 2) % tensor == 0 else None  # whole (k, v) pairs per device
  P = jax.sharding.PartitionSpec
  fn = jax.shard_map(local, in_specs=(P(batch, None, heads, None), P(None, batch, None, heads, None), P(),
                                      P(batch)), out_specs=P(batch, None, heads, None), check_vma=False)
  return fn(q_BxTxNxH, cache_k, layer, kv_lengths_B)
