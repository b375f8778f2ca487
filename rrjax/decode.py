"""`rrjax.generate`: ragged prompts in, generated ids, logprobs (and logits) out, on the engine's slots.

`generate(model, prompts, max_new_tokens=...)` queues one engine request per prompt (rrjax.engine): each
prompt is prefilled right-padded into a free slot, and every slot decodes until its own stop id or budget,
then takes the next queued prompt; `engine.slots` is the number of slots (default: as many as the memory
budget holds, at most one per prompt). Prompt
lengths and the new-token budget are rounded up to buckets, so reranking thousands of windows compiles a
handful of programs. On a mesh the weights follow the model's logical-axis rules, the slots are split over
data (and fsdp), and the cache over kv heads where the tensor axis divides them.

Shapes: B slots (bucketed), P prompt positions (bucketed), N new-token positions (bucketed), S = P + N
positions per slot, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from rrjax import sampling
from rrjax.engine import config as config_lib
from rrjax.engine import core, memory
from rrjax.engine.config import EngineConfig, plans_made
from rrjax.engine.memory import DecodeMemoryError
from rrjax.engine.programs import Buckets, bucket, compilation_count
from rrjax.model.qwen2 import Qwen2, Qwen2Config

__all__ = ["Buckets", "DecodeMemoryError", "EngineConfig", "Generation", "bucket", "compilation_count", "generate",
           "plans_made", "programs"]


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


def _per_prompt(value, n: int, name: str) -> list[int]:
  values = [int(value)] * n if np.ndim(value) == 0 else [int(v) for v in value]
  if len(values) != n:
    raise ValueError(f"{name}: {len(values)} values for {n} prompts")
  if any(v < 0 for v in values):
    raise ValueError(f"{name}={min(values)} must be >= 0")
  return values


def _plan(model, want: EngineConfig, rows: int, P: int, N: int, *, copies: int, stops: int, mesh, memory_limit_bytes,
          check=True, what: str) -> EngineConfig:
  """The engine of `rows` rows of P prompt + N new positions: `want`'s slots (bucketed, at most one per row) or
  as many as the budget holds, its steps per call at most N, stop slots for `stops` ids (rrjax.engine.plan)."""
  multiple = memory.data_shards(mesh)
  b = want.buckets
  slots = b.batch(min(want.slots, rows), multiple) if want.slots else 0
  group = min(b.batch(want.prefill_group, multiple), slots or rows) if want.prefill_group else 0
  want = dataclasses.replace(want, slots=slots, prefill_group=group, length=max(want.length, P + N),
                             steps_per_call=min(want.steps_per_call, N), stop_slots=max(want.stop_slots,
                                                                                          bucket(stops, 8)))
  return config_lib.plan(model, want, prompt_len=P, mesh=mesh, num_slots=rows, copies=copies,
                         memory_limit_bytes=memory_limit_bytes, check=check, what=what)


def generate(model: Qwen2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             min_new_tokens: int | Sequence[int] = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0, stop_ids: Sequence[int] | None = None, num_samples: int = 1,
             mesh: Mesh | None = None, engine: EngineConfig = EngineConfig(),
             memory_limit_bytes: int | None = None) -> Generation:
  """Generates up to `max_new_tokens` ids after each prompt (token-id lists of any lengths).

  `max_new_tokens` and `min_new_tokens` are one int or one per prompt. temperature 0 is greedy; otherwise
  tokens are sampled from softmax(logits / temperature) after min-p, top-k and top-p (vLLM's order: see
  rrjax.sampling). Prompt i's random stream depends only on (seed, i, token index). A row stops after
  emitting one of `stop_ids` (default: the Qwen2.5 tokenizer's, <|endoftext|> and <|im_end|>; pass () to
  never stop); the stop id is included in its tokens. Stop ids are banned until `min_new_tokens` tokens exist.
  `engine` shapes the engine (rrjax.engine.EngineConfig): its `slots` decode slots (at most one per row),
  refilled with the next prompt as rows finish, or with slots=0 (the default) as many as the memory budget
  holds; `prefill_group`, `buckets`, `cache_dtype`, `return_logits` likewise; its sampling comes from this
  call's arguments. The plan is kept per shape: a second call on the same shapes plans and compiles nothing.
  With `mesh`, weights are placed per the model's logical-axis rules and the slots are split over the data
  axes. Raises DecodeMemoryError when the estimated per-device memory exceeds the device limit (on CPU, the
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
  if not prompts or max(max_new) == 0:  # (n rows of nothing)
    return Generation([[] for _ in range(n)], [[] for _ in range(n)], [0] * n, ["length"] * n,
                      [np.zeros((0, config.vocab_size), np.float32) for _ in range(n)] if engine.return_logits
                      else None)

  P = engine.buckets.prompt(max(len(p) for p in prompts))
  N = engine.buckets.new_tokens(max(max_new))
  longest = max(range(len(prompts)), key=lambda i: len(prompts[i]) + max_new[i])
  planned = _plan(model, dataclasses.replace(engine, sampling=settings), n, P, N, copies=G, stops=len(stop_ids),
                  mesh=mesh,
                  memory_limit_bytes=memory_limit_bytes,
                  what=f"prompt {longest} ({len(prompts[longest])} tokens, {max_new[longest]} new)")
  eng = core.Engine(model, planned, mesh)
  # Longest first: prompts of similar length share a prefill, and the longest rows do not start last.
  requests = [core.Request(p, max_new[i], min_new[i], stop_ids, settings.temperature, settings.top_p, seed, id=i * G,
                           copies=G, priority=-len(p)) for i, p in enumerate(prompts)]
  results = eng.run(requests)
  eng.release()
  est = planned.estimate
  report = {"slots": planned.slots, "prefill_group": planned.prefill_group, "prefill_chunk": planned.prefill_chunk,
            "slot_length": eng.length, "budget_bytes": est.limit, "estimate_bytes": est.total, **eng.stats.as_dict()}
  return Generation(tokens=[r.tokens for r in results], logprobs=[r.logprobs for r in results],
                    lengths=[len(r.tokens) for r in results], finish_reasons=[r.finish_reason for r in results],
                    logits=[r.logits for r in results] if engine.return_logits else None, engine=report)


def programs(model: Qwen2, num_prompts: int, prompt_len: int, *, max_new_tokens: int, num_samples: int = 1,
             engine: EngineConfig = EngineConfig(), stop_ids: Sequence[int] = (), mesh: Mesh | None = None,
             memory_limit_bytes: int | None = None, prefix: str = "rollout_") -> list[tuple[str, object, tuple]]:
  """The hook for ahead-of-time builds (rrjax.preflight): `[(name, jitted program, abstract arguments)]` of
  the engine programs `generate(..., engine=engine)` runs for `num_prompts` prompts (times `num_samples`) of
  up to `prompt_len` tokens, bucketed as `generate` buckets them, with `engine.sampling`: `prefix` + prefill
  (its arguments are params, tokens [G, P], lengths, slots, cache), insert and decode. The engine is
  planned for `memory_limit_bytes` as `generate` plans it; without a limit, fixed slots are taken as given (no
  memory check: the compiler measures). `model` may be abstract (ShapeDtypeStruct leaves on their shardings);
  `program.lower(*arguments).compile()` under the mesh builds what `generate` would run, nothing allocated."""
  n = num_prompts * num_samples
  P, N = engine.buckets.prompt(prompt_len), engine.buckets.new_tokens(max_new_tokens)
  # The plan's prefill group is the engine's largest (rrjax.engine.config.group_cap).
  planned = _plan(model, engine, n, P, N, copies=num_samples, stops=len({int(s) for s in stop_ids}), mesh=mesh,
                  memory_limit_bytes=memory_limit_bytes, check=memory_limit_bytes is not None,
                  what=f"a prompt of {P} tokens ({N} new)")
  built = core.abstract_programs(model, planned, prompt_len=P, mesh=mesh, copies=bucket(num_samples, 1))
  return [(prefix + name, fn, args) for name, fn, args in built]
