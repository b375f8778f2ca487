"""Memory of the engine, known from shapes and shardings before anything is allocated, and the budget.

Per device: the weights, the slot cache (slots x length keys/values plus the slots' small state), and the
larger of the two programs' temporaries: a prefill group (its prompt keys/values, the attention scores, the
MLP, the last-position logits) or a decode call (logits and sampling over the vocabulary, the attention
over the cache, the call's outputs). The budget is the device's `bytes_limit`; where a device reports no
limit (CPU), it is the host's available memory (shared by the host's devices) plus the weights already
resident in it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from rrjax import hardware
from rrjax import sharding as sharding_lib
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import Qwen2Config

GiB = 1024**3
HOST_FRACTION = 0.85  # of the host's available memory: the runtime, Python and the caller need the rest
MIN_CHUNK = 256  # prompts are never prefilled in chunks shorter than this
SLOT_STATE_INTS = 10  # int32/float32 words of per-slot state, besides the stop ids


class DecodeMemoryError(ValueError):
  """The cache, weights and temporaries of a decode do not fit in device memory."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Peak bytes per device (the largest device), and the device limit if known."""

  weights: int
  kv_cache: int
  activations: int
  limit: int | None
  headroom: float = 0.0  # of the limit kept free: what fits stays below (1 - headroom) x limit

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.activations

  @property
  def fits(self) -> bool:
    return self.limit is None or self.total <= self.limit * (1 - self.headroom)

  def describe(self) -> str:
    limit = "unknown" if self.limit is None else f"{self.limit / GiB:.3f} GiB" + (
        f" (of which {self.headroom:.0%} is kept free)" if self.headroom else "")
    return (f"{self.total / GiB:.3f} GiB per device (weights {self.weights / GiB:.3f}, KV cache "
            f"{self.kv_cache / GiB:.3f}, activations {self.activations / GiB:.3f}); device limit {limit}")


def data_shards(mesh: Mesh | None) -> int:
  """Devices the batch (slots, prefill rows) is split over."""
  if mesh is None:
    return 1
  names = dict(sharding_lib.current_rules()).get("batch") or ()
  sizes = sharding_lib.mesh_sizes(mesh)
  return math.prod(sizes.get(a, 1) for a in ((names,) if isinstance(names, str) else names))


def _shard_bytes(shape, dtype, sharding) -> int:
  shard = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
  return math.prod(shard) * jnp.dtype(dtype).itemsize


def weight_bytes(model, mesh: Mesh | None = None) -> int:
  """Bytes of the largest device's share of the weights (as placed on `mesh`, else as they lie now)."""
  state = nnx.state(model)
  leaves = jax.tree.leaves(nnx.to_pure_dict(state))
  if mesh is not None:
    shardings = jax.tree.leaves(sharding_lib.state_shardings(state, mesh))
    return sum(_shard_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, shardings))
  return sum(_shard_bytes(x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


def budget(mesh: Mesh | None = None, *, weights: int = 0) -> int:
  """Per-device bytes for weights, cache and temporaries: the devices' limit, or on CPU the host's
  available memory split over the devices in use, plus the `weights` already resident there."""
  devices = list(mesh.devices.flat) if mesh is not None else [jax.local_devices()[0]]
  limit = hardware.device_memory_limit(devices)
  if limit is not None:
    return limit
  local = sum(d.process_index == jax.process_index() for d in devices) or 1
  return int(hardware.host_available_bytes() * HOST_FRACTION) // local + weights


WEIGHT_SHARE = 0.6  # of a device's memory the weights may take, the rest left for the slot cache


def inference_mesh(config: Qwen2Config, devices, param_dtype: str,
                   memory_limit_bytes: int | None = None) -> sharding_lib.MeshConfig:
  """The default inference mesh over `devices`: one replica per device (data parallel) when the weights fit
  one device beside a cache, else tensor parallelism over the fewest devices that hold them (preferring
  sizes that divide the heads), the rest replicas."""
  n = len(devices)
  limit = (memory_limit_bytes or hardware.device_memory_limit(devices)
           or int(hardware.host_available_bytes() * HOST_FRACTION) // n)
  weights = config.param_count() * jnp.dtype(param_dtype).itemsize
  sizes = [t for t in range(1, n + 1) if n % t == 0]
  even = [t for t in sizes if config.num_kv_heads % t == 0 and config.num_heads % t == 0]
  for t in even + [t for t in sizes if t not in even]:
    if weights / t <= WEIGHT_SHARE * limit:
      return sharding_lib.MeshConfig(data=n // t, fsdp=1, tensor=t)
  return sharding_lib.MeshConfig(data=1, fsdp=1, tensor=n)


def fused_prefill(config: Qwen2Config) -> bool:
  """Whether prefill attention runs in a tiled kernel (splash, cuDNN) rather than materialising scores."""
  return config.attention in ("cudnn", "splash") or (config.attention == "auto" and hardware.platform() != "cpu")


def estimate(model, *, slots: int, length: int, prefill_rows: int, prompt_len: int, chunk: int | None = None,
             cache_dtype: str, mesh: Mesh | None = None, steps: int = 64, return_logits: bool = False,
             stop_slots: int = 8, memory_limit_bytes: int | None = None, weights: int | None = None,
             headroom: float = 0.0) -> MemoryEstimate:
  """Per-device peak of an engine of `slots` x `length` cache positions that prefills `prefill_rows` prompts
  of `prompt_len` tokens at a time (in chunks of `chunk` tokens, or whole) and decodes `steps` tokens per
  call. Nothing is allocated."""
  c = model.config
  sizes = sharding_lib.mesh_sizes(mesh)
  tensor = sizes.get("tensor", 1)
  kv_heads = c.num_kv_heads // tensor if c.num_kv_heads % tensor == 0 else c.num_kv_heads
  heads = c.num_heads // tensor if c.num_heads % tensor == 0 else c.num_heads
  vocab = c.vocab_size // tensor if c.vocab_size % tensor == 0 else c.vocab_size
  shards = data_shards(mesh)
  slots_local = -(-slots // shards) if slots % shards == 0 else slots
  rows = -(-prefill_rows // shards) if prefill_rows % shards == 0 else prefill_rows
  kv_item = jnp.dtype(cache_dtype).itemsize
  item = jnp.dtype(c.dtype).itemsize
  L, H, D, F = c.num_layers, c.head_dim, c.hidden_size, c.intermediate_size

  if weights is None:
    weights = weight_bytes(model, mesh)
  cache = 2 * L * slots_local * length * kv_heads * H * kv_item + slots * (SLOT_STATE_INTS + stop_slots) * 4

  # Prefill: the group's keys/values before they are placed into slots, then per layer (layers run one at
  # a time) the attention scores in float32 unless a fused kernel tiles them (XLA on CPU holds three
  # score-sized buffers at its peak, measured, and its dense mask), the projections and MLP of the tokens
  # in flight, and the last-position logits.
  q_len = chunk or prompt_len
  fused = fused_prefill(c) and not chunk
  if fused:
    scores = 2 * heads * q_len * min(prompt_len, 512) * 4
  else:
    scores = (3 * heads * 4 + 1) * attention_lib.xla_score_elements(q_len, prompt_len, causal_only=not chunk)
  # A chunked prefill holds its prefix and, when it is placed into slots, the prefix with padding zeroed; rows
  # split over more than two devices reach their slots round a ring of them (programs._place), each device
  # holding its rows and the ones arriving (over two, XLA's scatter: no more than one prefix's worth measured).
  prefixes = 2 if chunk or shards > 2 and rows < prefill_rows else 1
  prefill = rows * (prefixes * 2 * L * prompt_len * kv_heads * H * kv_item
                    + scores
                    + q_len * (3 * F + 4 * D + (heads + 2 * kv_heads) * H) * item
                    + prompt_len * D * 4
                    + 2 * vocab * 4)
  # Decode: float32 logits and their softmax/filters over the vocabulary, the attention of one query over
  # every slot position, one layer's keys/values read out of the cache, and the call's outputs.
  decode = slots_local * (4 * vocab * 4 + vocab + 2 * heads * length * 4 + 2 * length * kv_heads * H * kv_item
                          + steps * (8 + (vocab * 4 if return_logits else 0)))
  if memory_limit_bytes is None:
    memory_limit_bytes = budget(mesh, weights=weights)
  return MemoryEstimate(int(weights), int(cache), int(max(prefill, decode)), memory_limit_bytes, headroom)
