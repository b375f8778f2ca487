"""`rrjax.generate`: ragged prompts in, generated ids, logprobs (and logits) out, on the engine's slots.

`generate(model, prompts, max_new_tokens=...)` queues one engine request per prompt (rrjax.engine): each
prompt is prefilled right-padded into a free slot, and every slot decodes until its own stop id or budget,
then takes the next queued prompt; `batch_size` is the number of slots (default: one per prompt). Prompt
lengths and the new-token budget are rounded up to buckets, so reranking thousands of windows compiles a
handful of programs. On a mesh the weights follow the model's logical-axis rules, the slots are split over
data (and fsdp), and the cache over kv heads where the tensor axis divides them.

Shapes: B slots (bucketed), P prompt positions (bucketed), N new-token positions (bucketed), S = P + N
positions per slot, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rrjax import sampling
from rrjax.engine import core, memory
from rrjax.engine.memory import DecodeMemoryError, MemoryEstimate
from rrjax.engine.programs import Buckets, bucket, compilation_count
from rrjax.model.qwen2 import Qwen2, Qwen2Config

__all__ = ["Buckets", "DecodeMemoryError", "Generation", "MemoryEstimate", "bucket", "compilation_count",
           "default_cache_dtype", "estimate_memory", "generate", "programs"]

GiB = memory.GiB
STEPS_PER_CALL = 64  # decode steps per engine call at most (a call returns early when a row finishes)
default_cache_dtype = core.default_cache_dtype


@dataclasses.dataclass(frozen=True)
class Generation:
  """Per row of the input prompts: generated ids (a final stop id is included, as in HF), the logprob of
  each (see rrjax.sampling.select), their count, and "stop" or "length"."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  lengths: list[int]
  finish_reasons: list[str]
  logits: list[np.ndarray] | None = None  # per row [length, V] float32; only with return_logits=True
  # The engine's shape, memory budget and estimate, and its counters (rrjax.engine.Stats) for this call.
  engine: dict | None = None


def _steps(new_tokens: int) -> int:
  return min(STEPS_PER_CALL, new_tokens)


def estimate_memory(model: Qwen2, batch: int, prompt_len: int, new_tokens: int, *, cache_dtype=None,
                    mesh: Mesh | None = None, memory_limit_bytes: int | None = None,
                    prefill_rows: int | None = None, chunk: int | None = None,
                    return_logits: bool = False) -> MemoryEstimate:
  """Per-device bytes of `generate` with `batch` slots of `prompt_len` + `new_tokens` positions, prefilling
  `prefill_rows` (default: `batch`) prompts at a time, computed from shapes and shardings before anything
  is allocated (see rrjax.engine.memory)."""
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(model.config)))
  return memory.estimate(model, slots=batch, length=prompt_len + new_tokens, prefill_rows=prefill_rows or batch,
                         prompt_len=prompt_len, chunk=chunk, cache_dtype=cache_dtype, mesh=mesh,
                         steps=_steps(new_tokens), return_logits=return_logits, memory_limit_bytes=memory_limit_bytes)


def _fit(model, B, G, P, N, cache_dtype, mesh, limit, return_logits):
  """(prefill chunk or None, estimate) for B slots and groups of G; chunks only where whole prompts do not fit."""
  est = estimate_memory(model, B, P, N, cache_dtype=cache_dtype, mesh=mesh, memory_limit_bytes=limit,
                        prefill_rows=G, return_logits=return_logits)
  if est.fits or memory.fused_prefill(model.config):
    return None, est
  best, size = (None, est), memory.MIN_CHUNK
  while size < P:  # the longest chunk that fits: fewer, larger steps
    chunked = estimate_memory(model, B, P, N, cache_dtype=cache_dtype, mesh=mesh, memory_limit_bytes=limit,
                              prefill_rows=G, chunk=size, return_logits=return_logits)
    if not chunked.fits:
      break
    best, size = (size, chunked), size * 2
  return best


def _check_memory(model, B, G, P, N, cache_dtype, mesh, limit, multiple, return_logits):
  chunk, est = _fit(model, B, G, P, N, cache_dtype, mesh, limit, return_logits)
  if est.fits:
    return chunk, est
  suggestion = None
  b = B
  while b > multiple:
    b = max(multiple, (b // 2) // multiple * multiple)
    if _fit(model, b, min(G, b), P, N, cache_dtype, mesh, est.limit, return_logits)[1].fits:
      suggestion = b
      break
  hint = (f"try batch_size={suggestion}" if suggestion else
          "even the smallest batch does not fit: use more devices (fsdp/tensor), a smaller cache_dtype, "
          "or shorter prompts / fewer new tokens")
  raise DecodeMemoryError(f"generate: batch {B} x {P} prompt + {N} new-token slots (cache {cache_dtype}) needs "
                          f"{est.describe()}; {hint}")


def _per_prompt(value, n: int, name: str) -> list[int]:
  values = [int(value)] * n if np.ndim(value) == 0 else [int(v) for v in value]
  if len(values) != n:
    raise ValueError(f"{name}: {len(values)} values for {n} prompts")
  if any(v < 0 for v in values):
    raise ValueError(f"{name}={min(values)} must be >= 0")
  return values


_PLANS: dict = {}  # shape key -> engine shape: a call on shapes already seen neither plans nor estimates again


def plans_made() -> int:
  """Engine shapes planned (or checked against the memory budget) since the process started."""
  return len(_PLANS)


def _engine_shape(model, n: int, P: int, N: int, *, batch_size, prefill_group, cache_dtype, mesh, memory_limit_bytes,
                  return_logits, buckets, what, check: bool = True) -> tuple[int, int, int | None, MemoryEstimate | None]:
  """(slots, prefill group, prefill chunk, estimate) of an engine for `n` rows of P prompt + N new positions:
  planned from the budget for batch_size="auto", else `batch_size` slots checked against the budget (with
  `check`; without, taken as given: no chunk, no estimate). Kept per shape (the model's config stands for its
  weights), so the budget is read when a shape is first seen."""
  key = (model.config, n, P, N, batch_size, prefill_group, cache_dtype, mesh, memory_limit_bytes, return_logits,
         buckets, check)
  if key not in _PLANS:
    _PLANS[key] = _plan_shape(model, n, P, N, batch_size=batch_size, prefill_group=prefill_group,
                              cache_dtype=cache_dtype, mesh=mesh, memory_limit_bytes=memory_limit_bytes,
                              return_logits=return_logits, buckets=buckets, what=what, check=check)
  return _PLANS[key]


def _plan_shape(model, n, P, N, *, batch_size, prefill_group, cache_dtype, mesh, memory_limit_bytes, return_logits,
                buckets, what, check):
  multiple = memory.data_shards(mesh)
  if batch_size == "auto":
    chosen = core.plan(model, length=P + N, prompt_len=P, num_slots=n, mesh=mesh, prefill_group=prefill_group,
                       cache_dtype=cache_dtype, steps=_steps(N), return_logits=return_logits, buckets=buckets,
                       memory_limit_bytes=memory_limit_bytes, what=what)
    return chosen.slots, chosen.prefill_group, chosen.chunk, chosen.estimate
  B = buckets.batch(min(batch_size or n, n), multiple)
  group = min(buckets.batch(prefill_group, multiple), B) if prefill_group else B
  if not check:
    return B, group, None, None
  chunk, est = _check_memory(model, B, group, P, N, cache_dtype, mesh, memory_limit_bytes, multiple, return_logits)
  return B, group, chunk, est


def generate(model: Qwen2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             min_new_tokens: int | Sequence[int] = 0, seed: int = 0, stop_ids: Sequence[int] | None = None,
             mesh: Mesh | None = None, batch_size: int | str | None = None, buckets: Buckets = Buckets(),
             cache_dtype: str | None = None, memory_limit_bytes: int | None = None, return_logits: bool = False,
             prefill_group: int | None = None, num_samples: int = 1) -> Generation:
  """Generates up to `max_new_tokens` ids after each prompt (token-id lists of any lengths).

  `max_new_tokens` and `min_new_tokens` are one int or one per prompt. temperature 0 is greedy; otherwise
  tokens are sampled from softmax(logits / temperature) after min-p, top-k and top-p (vLLM's order: see
  rrjax.sampling). Prompt i's random stream
  depends only on (seed, i, token index). A row stops after emitting one of `stop_ids` (default: the
  Qwen2.5 tokenizer's, <|endoftext|> and <|im_end|>; pass () to never stop); the stop id is included in
  its tokens. Stop ids are banned until `min_new_tokens` tokens exist. `batch_size` is the number of decode
  slots (default: one per prompt), refilled with the next prompt as rows finish; `prefill_group` prompts
  (default: `batch_size`) are prefilled at a time. `batch_size="auto"` chooses both from the memory budget
  (rrjax.engine.plan: as many slots as fit, then the largest prefill group beside them). With `mesh`,
  weights are placed per the model's logical-axis rules and the slots are split over the data axes.
  Raises DecodeMemoryError when the estimated per-device memory exceeds the device limit (on CPU, the
  host's available memory), or `memory_limit_bytes`. `num_samples` = G continuations of each prompt come
  from one prefill inserted into G slots (GRPO's rollouts): the rows are prompt-major (prompt i's samples are
  rows i*G .. i*G+G-1) and equal, stream for stream, those of the list with each prompt repeated G times.
  """
  config: Qwen2Config = model.config
  prompts = [list(map(int, p)) for p in prompts]
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  G = num_samples
  n = len(prompts) * G  # output rows
  settings = sampling.Sampling(float(temperature), int(top_k), float(top_p), float(min_p))
  max_new = _per_prompt(max_new_tokens, len(prompts), "max_new_tokens")
  min_new = _per_prompt(min_new_tokens, len(prompts), "min_new_tokens")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty")
    if min(p) < 0 or max(p) >= config.vocab_size:
      raise ValueError(f"prompt {i} has a token id outside [0, {config.vocab_size})")
  if stop_ids is None:
    from rrjax import tokenizer as tokenizer_lib
    stop_ids = tokenizer_lib.load().stop_ids
  stop_ids = tuple(sorted({int(s) for s in stop_ids}))
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(config)))
  if not prompts or max(max_new) == 0:  # (n rows of nothing)
    return Generation([[] for _ in range(n)], [[] for _ in range(n)], [0] * n, ["length"] * n,
                      [np.zeros((0, config.vocab_size), np.float32) for _ in range(n)] if return_logits else None)

  P = buckets.prompt(max(len(p) for p in prompts))
  N = buckets.new_tokens(max(max_new))
  longest = max(range(len(prompts)), key=lambda i: len(prompts[i]) + max_new[i])
  B, group, chunk, est = _engine_shape(
      model, n, P, N, batch_size=batch_size, prefill_group=prefill_group, cache_dtype=cache_dtype, mesh=mesh,
      memory_limit_bytes=memory_limit_bytes, return_logits=return_logits, buckets=buckets,
      what=f"prompt {longest} ({len(prompts[longest])} tokens, {max_new[longest]} new)")
  engine = core.Engine(model, slots=B, max_length=P + N, mesh=mesh, sampling=settings, steps_per_call=_steps(N),
                       prefill_group=group, prefill_chunk=chunk, buckets=buckets, cache_dtype=cache_dtype,
                       return_logits=return_logits, stop_slots=max(8, bucket(len(stop_ids), 8)))
  # Longest first: prompts of similar length share a prefill, and the longest rows do not start last.
  requests = [core.Request(p, max_new[i], min_new[i], stop_ids, settings.temperature, settings.top_p, seed, id=i * G,
                           copies=G, priority=-len(p)) for i, p in enumerate(prompts)]
  results = engine.run(requests)
  engine.release()
  report = {"slots": B, "prefill_group": group, "prefill_chunk": chunk, "slot_length": engine.length,
            "budget_bytes": est.limit, "estimate_bytes": est.total, **engine.stats.as_dict()}
  return Generation(tokens=[r.tokens for r in results], logprobs=[r.logprobs for r in results],
                    lengths=[len(r.tokens) for r in results], finish_reasons=[r.finish_reason for r in results],
                    logits=[r.logits for r in results] if return_logits else None, engine=report)


def programs(model: Qwen2, num_prompts: int, prompt_len: int, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, stop_ids: Sequence[int] = (),
             mesh: Mesh | None = None, batch_size: int | str | None = None, buckets: Buckets = Buckets(),
             cache_dtype: str | None = None,
             return_logits: bool = False, num_samples: int = 1, prefill_group: int | None = None,
             memory_limit_bytes: int | None = None, prefix: str = "rollout_") -> list[tuple[str, object, tuple]]:
  """The hook for ahead-of-time builds (rrjax.preflight): `[(name, jitted program, abstract arguments)]` of
  the engine programs `generate` runs for `num_prompts` prompts (times `num_samples`) of up to `prompt_len`
  tokens with these settings, bucketed as `generate` buckets them: `prefix` + prefill (its arguments are
  params, tokens [G, P], lengths, slots, cache), insert and decode. `batch_size="auto"` plans the slots,
  prefill group and chunk for `memory_limit_bytes` as `generate` does; an explicit one is taken as given
  (no memory check: the compiler measures). `model` may be abstract (ShapeDtypeStruct leaves on their
  shardings); `program.lower(*arguments).compile()` under the mesh builds what `generate` would run, nothing
  allocated."""
  config: Qwen2Config = model.config
  settings = sampling.Sampling(float(temperature), int(top_k), float(top_p), float(min_p))
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(config)))
  n = num_prompts * num_samples
  P, N = buckets.prompt(prompt_len), buckets.new_tokens(max_new_tokens)
  B, group, chunk, _ = _engine_shape(
      model, n, P, N, batch_size=batch_size, prefill_group=prefill_group, cache_dtype=cache_dtype, mesh=mesh,
      memory_limit_bytes=memory_limit_bytes, return_logits=return_logits, buckets=buckets,
      what=f"a prompt of {P} tokens ({N} new)", check=False)
  # The engine's largest prefill (Engine._take): prompts whose copies fill at most the B slots; with C copies
  # a group's first and last prompt may bring only part of theirs.
  C = bucket(num_samples, 1)
  requests = B if num_samples == 1 else 1 + -(-(B - 1) // num_samples)
  group = min(group, buckets.batch(min(group, num_prompts, requests), memory.data_shards(mesh)))
  stops = len({int(s) for s in stop_ids})
  built = core.abstract_programs(model, slots=B, max_length=P + N, prompt_len=P, prefill_group=group,
                                 prefill_chunk=chunk, copies=C, mesh=mesh, sampling=settings,
                                 steps_per_call=_steps(N), cache_dtype=cache_dtype, return_logits=return_logits,
                                 stop_slots=max(8, bucket(stops, 8)))
  return [(prefix + name, fn, args) for name, fn, args in built]
