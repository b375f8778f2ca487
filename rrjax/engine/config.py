"""One frozen `EngineConfig` per engine, made by one planning function from a memory budget.

    config = plan(model, EngineConfig(length=4096, sampling=Sampling(0.6, top_p=0.95)), prompt_len=3072)
    engine = Engine(model, config, mesh)

A field left at 0 (slots, prefill group) or None (prefill chunk, cache dtype) is the planner's to choose: as
many slots as fit (up to `num_slots`), then the largest prefill group beside them, then prefill chunks only
where whole prompts do not fit. Fields the caller fixes are checked against the budget. Plans are kept by
shape, so a second engine on shapes already seen plans nothing.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.sharding import Mesh

from rrjax import hardware
from rrjax import sharding as sharding_lib
from rrjax.engine import memory
from rrjax.engine.programs import Buckets, Spec
from rrjax.model import attention as attention_lib
from rrjax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """The shape and settings of one engine (see the module docstring for what 0 and None leave to `plan`)."""

  slots: int = 0
  length: int = 0  # positions per slot: prompt + new tokens (rounded up to the kernel's pages)
  prefill_group: int = 0  # prompts per prefill call
  prefill_chunk: int | None = None  # tokens per prefill chunk; None: whole prompts
  cache_dtype: str | None = None  # None: `default_cache_dtype`
  cache_layout: str | None = None  # "paged" or "split"; None: the decode kernel's
  steps_per_call: int = 64  # decode steps per engine call at most (a call returns early when a row finishes)
  buckets: Buckets = Buckets()
  return_logits: bool = False  # keep each generated token's float32 logits
  stop_slots: int = 8  # stop ids per request at most
  sampling: Sampling = Sampling()  # the programs' sampling structure; requests bring temperature and top-p
  estimate: memory.MemoryEstimate | None = dataclasses.field(default=None, compare=False)

  def resolved(self, model_config, mesh: Mesh | None = None) -> EngineConfig:
    """This config with its cache dtype named, its length in whole pages and its prefill group at most the
    slots (all of them when unset): what an Engine runs."""
    dtype = str(jnp.dtype(self.cache_dtype or default_cache_dtype(model_config)))
    kernel = "ragged" if self.cache_layout == "paged" else decode_kernel(model_config, dtype, mesh)
    group = min(self.prefill_group or self.slots, self.slots) if self.slots else self.prefill_group
    return dataclasses.replace(self, cache_dtype=dtype, length=slot_length(self.length, kernel), prefill_group=group)

  def spec(self, graphdef, model_config, mesh: Mesh | None = None) -> Spec:
    """The programs' shared shape (rrjax.engine.programs.Spec) of an engine with this (resolved) config."""
    return Spec(graphdef, model_config, mesh, self.slots, self.length, self.cache_dtype,
                decode_kernel(model_config, self.cache_dtype, mesh), self.sampling.static_key(), self.stop_slots,
                self.steps_per_call, self.return_logits, self.cache_layout)

  def chunk_for(self, prompt: int) -> int | None:
    """The prefill chunk of a `prompt`-position prefill (None: whole)."""
    return self.prefill_chunk if self.prefill_chunk and self.prefill_chunk < prompt else None


def decode_kernel(config, cache_dtype: str, mesh: Mesh | None = None) -> str:
  """The attention kernel of the decode program, for the platform programs are built for."""
  return attention_lib.slot_kernel(config.attention, dtype=cache_dtype, num_heads=config.num_heads,
                                   num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                   tensor=sharding_lib.mesh_sizes(mesh).get("tensor", 1))


def default_cache_dtype(config) -> str:
  """bf16 on accelerators; the model's compute dtype on CPU (where bf16 is slow and tests want f32)."""
  return config.dtype if hardware.platform() == "cpu" else "bfloat16"


def slot_length(length: int, kernel: str) -> int:
  """`length` rounded up to whole pages where the kernel reads the cache as pages."""
  return -(-length // 8) * 8 if attention_lib.slot_layout(kernel) == "paged" else length


def descending(buckets: Buckets, n: int, multiple: int) -> list[int]:
  """Bucket sizes from the one holding `n` down to `multiple`."""
  sizes = [buckets.batch(n, multiple)]
  while sizes[-1] > multiple:
    sizes.append(max(multiple, (sizes[-1] // 2) // multiple * multiple))
  return sizes


# Of the memory budget, never planned for: what the estimate does not see (fragmentation, runtime buffers; the
# compiled programs come within a few percent of it).
HEADROOM = 0.10
_PLANS: dict = {}  # plan's arguments -> its config: shapes already seen are neither planned nor estimated again


def plans_made() -> int:
  """Engine configs planned (or checked against a memory budget) since the process started."""
  return len(_PLANS)


def plan(model, want: EngineConfig, *, prompt_len: int, mesh: Mesh | None = None, num_slots: int | None = None,
         copies: int = 1, memory_limit_bytes: int | None = None, check: bool = True,
         what: str = "a request") -> EngineConfig:
  """`want` resolved for prompts of up to `prompt_len` positions within the budget (`memory_limit_bytes`, else
  the devices' limit or the host's memory on CPU) less HEADROOM, with its estimate (its `limit` the budget, its
  `headroom` the part kept free): slots left at 0 become the most, up to `num_slots` rows (`copies` per
  prompt), that fit; an unset prefill group the most prompts, up to what one prefill can take (`group_cap`),
  that fit beside them.
  Without `check`, fixed slots are taken as given (no estimate: the compiler measures). Raises
  DecodeMemoryError naming `what`, the sizes and the slots that would fit. Kept per argument (the model's config
  stands for its weights), so the budget is read when a shape is first seen."""
  key = (model.config, want, prompt_len, mesh, num_slots, copies, memory_limit_bytes, check)
  if key not in _PLANS:
    _PLANS[key] = _plan(model, want, prompt_len, mesh, num_slots, copies, memory_limit_bytes, check, what)
  return _PLANS[key]


def group_cap(slots: int, rows: int | None, copies: int) -> int:
  """The most prompts one prefill into `slots` free slots takes (Engine._take) when `rows` rows come as
  `copies` copies of each prompt: a group's first and last prompt may bring only part of their copies."""
  prompts = -(-rows // copies) if rows else slots
  return min(prompts, slots if copies == 1 else 1 + -(-(slots - 1) // copies))


def _plan(model, want: EngineConfig, prompt_len, mesh, num_slots, copies, limit, check, what) -> EngineConfig:
  resolved = want.resolved(model.config, mesh)
  if want.slots and not check:
    cap = want.buckets.batch(group_cap(want.slots, num_slots, copies), memory.data_shards(mesh))
    return dataclasses.replace(resolved, prefill_group=min(resolved.prefill_group, cap))
  want = dataclasses.replace(resolved, prefill_group=want.prefill_group)  # unset: searched below
  multiple = memory.data_shards(mesh)
  weights = memory.weight_bytes(model, mesh)
  limit = limit if limit is not None else memory.budget(mesh, weights=weights)

  def est(b, g, ch):
    return memory.estimate(model, slots=b, length=want.length, prefill_rows=g, prompt_len=prompt_len, chunk=ch,
                           cache_dtype=want.cache_dtype, mesh=mesh, steps=want.steps_per_call,
                           return_logits=want.return_logits, stop_slots=want.stop_slots, memory_limit_bytes=limit,
                           weights=weights, headroom=HEADROOM)

  def fit(b) -> EngineConfig | None:
    """The largest prefill group (and its chunk) that fits beside `b` slots."""
    top = group_cap(b, num_slots, copies)
    for g in [min(want.prefill_group, b)] if want.prefill_group else descending(want.buckets, top, multiple):
      chunk = want.prefill_chunk
      if chunk is None and not est(b, g, None).fits:  # the longest chunk that fits: fewer, larger steps
        size = memory.MIN_CHUNK
        while size * 2 < prompt_len and est(b, g, size * 2).fits:
          size *= 2
        chunk = size if size < prompt_len else None
      e = est(b, g, chunk)
      if e.fits:
        return dataclasses.replace(want, slots=b, prefill_group=g, prefill_chunk=chunk, estimate=e)
    return None

  for b in [want.slots] if want.slots else descending(want.buckets, num_slots or 1, multiple):
    if (planned := fit(b)) is not None:
      return planned
  b = want.slots or multiple
  need = est(b, min(want.prefill_group or b, b), want.prefill_chunk)
  sizes = (f"{what}: {b} slot{'s' * (b > 1)} of {prompt_len} prompt + {want.length - prompt_len} new-token "
           f"positions (cache {want.cache_dtype}) need {need.describe()}")
  if fewer := next((s for s in descending(want.buckets, b, multiple)[1:] if fit(s)), None):
    raise memory.DecodeMemoryError(f"{sizes}; at most {fewer} slots fit: try batch_size={fewer}")
  at = "1 slot" if multiple == 1 else f"{multiple} slots (one per data shard)"
  raise memory.DecodeMemoryError(f"{sizes}; it does not fit even at {at}: use more devices (fsdp/tensor), a "
                                 "smaller cache_dtype, or shorter prompts / fewer new tokens")
