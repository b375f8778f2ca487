"""The continuous-batching engine: a fixed number of decode slots, refilled from a queue as rows finish.

    engine = Engine(model, slots=8, max_length=4096)
    results = engine.run([Request(prompt_ids, max_new_tokens=512, stop_ids=tok.stop_ids), ...])

Each slot's cache is contiguous and filled from position 0, so a row's length is both its RoPE position and
its write index. The host loop: prefill queued prompts in groups into free slots (one prefill may fill
several slots: G rollouts of one prompt), sample their first tokens (insert), then run one decode call of
up to `steps_per_call` steps that returns as soon as a row stops or reaches its budget; finished slots are
freed and refilled before the next call. Requests carry their own budgets and stop ids; sampling keys come
from (seed, request id, token index), so a request's tokens do not depend on its slot or neighbours.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rrjax import hardware
from rrjax import sharding as sharding_lib
from rrjax.engine import memory
from rrjax.engine import programs as programs_lib
from rrjax.engine.programs import Buckets, Programs, Spec
from rrjax.model import attention as attention_lib
from rrjax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to continue. `copies` samples share one prefill (copy j draws with id `id + j`); smaller
  `priority` goes first, ties in submission order; `tag` is the caller's, returned with each result."""

  prompt: Sequence[int]
  max_new_tokens: int
  min_new_tokens: int = 0
  stop_ids: Sequence[int] = ()
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  id: int = 0
  copies: int = 1
  priority: Any = 0.0  # any comparable (numbers, tuples of numbers), the same kind across an engine's requests
  tag: Any = None


@dataclasses.dataclass
class Result:
  """A finished copy of a request: its generated ids (a final stop id included), their logprobs, "stop" or
  "length", and per token the float32 logits [length, V] when the engine keeps them."""

  request: Request
  copy: int
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str
  logits: np.ndarray | None = None
  seq: int = 0  # the request's submission number in its engine


@dataclasses.dataclass
class Stats:
  """Counters of an engine's life: calls, steps, slot-steps that produced a token, tokens and seconds."""

  prefill_calls: int = 0
  prefill_rows: int = 0
  prefill_tokens: int = 0  # real prompt tokens (padding excluded)
  prefill_seconds: float = 0.0
  decode_calls: int = 0
  decode_steps: int = 0
  live_slot_steps: int = 0
  slot_steps: int = 0
  decode_seconds: float = 0.0
  generated_tokens: int = 0

  @property
  def occupancy(self) -> float:
    """Fraction of decoded slot-steps that advanced a request."""
    return self.live_slot_steps / self.slot_steps if self.slot_steps else 0.0

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "occupancy": self.occupancy}


@dataclasses.dataclass
class _Live:
  request: Request
  seq: int
  copy: int
  tokens: list
  logprobs: list
  logits: list | None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Slots, slot length, prefill group and chunk chosen for a memory budget, with their estimate."""

  slots: int
  length: int
  prefill_group: int
  chunk: int | None
  estimate: memory.MemoryEstimate


def _tensor(mesh: Mesh | None) -> int:
  return 1 if mesh is None else dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)


def decode_kernel(config, cache_dtype: str, mesh: Mesh | None = None) -> str:
  """The attention kernel of the decode program, for the platform programs are built for."""
  return attention_lib.slot_kernel(config.attention, dtype=cache_dtype, num_heads=config.num_heads,
                                   num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, tensor=_tensor(mesh))


def default_cache_dtype(config) -> str:
  """bf16 on accelerators; the model's compute dtype on CPU (where bf16 is slow and tests want f32)."""
  return config.dtype if hardware.platform() == "cpu" else "bfloat16"


def slot_length(length: int, kernel: str) -> int:
  """`length` rounded up to whole pages where the kernel reads the cache as pages."""
  return -(-length // 8) * 8 if attention_lib.slot_layout(kernel) == "paged" else length


def plan(model, *, length: int, prompt_len: int, num_slots: int | None = None, mesh: Mesh | None = None,
         slots: int | None = None, prefill_group: int | None = None, chunk: int | None = None,
         cache_dtype: str | None = None, steps: int = 64, return_logits: bool = False, buckets: Buckets = Buckets(),
         memory_limit_bytes: int | None = None, what: str = "a request") -> Plan:
  """The engine shape for a budget (the device limit, or the host's memory on CPU): `slots` (default: the
  most, up to `num_slots`, that fit), the prefill group (default: the most rows, up to the slots, that fit
  beside them) and prefill chunks where a whole prompt's attention scores would not fit. Raises
  DecodeMemoryError, naming `what` and the sizes, when even one slot does not fit."""
  c = model.config
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(c)))
  length = slot_length(length, decode_kernel(c, cache_dtype, mesh))
  multiple = memory.data_shards(mesh)
  weights = memory.weight_bytes(model, mesh)
  limit = memory_limit_bytes if memory_limit_bytes is not None else memory.budget(mesh, weights=weights)

  def est(b, g, ch):
    return memory.estimate(model, slots=b, length=length, prefill_rows=g, prompt_len=prompt_len, chunk=ch,
                           cache_dtype=cache_dtype, mesh=mesh, steps=steps, return_logits=return_logits,
                           memory_limit_bytes=limit, weights=weights)

  def chunk_for(b, g):
    if chunk is not None or est(b, g, None).fits:
      return chunk, est(b, g, chunk).fits
    size = memory.MIN_CHUNK
    while size * 2 < prompt_len and est(b, g, size * 2).fits:
      size *= 2
    return (size, True) if size < prompt_len and est(b, g, size).fits else (None, False)

  candidates = [slots] if slots else _descending(buckets, num_slots or 1, multiple)
  for b in candidates:
    groups = [prefill_group] if prefill_group else _descending(buckets, b, multiple)
    for g in groups:
      ch, ok = chunk_for(b, g)
      if ok:
        return Plan(b, length, g, ch, est(b, g, ch))
  smallest = est(multiple, multiple, None)
  at = "1 slot" if multiple == 1 else f"{multiple} slots (one per data shard)"
  raise memory.DecodeMemoryError(
      f"{what} ({prompt_len} prompt + {length - prompt_len} new-token positions, cache {cache_dtype}) does not fit "
      f"even at {at}: needs {smallest.describe()}; use more devices (fsdp/tensor), a smaller cache_dtype, or "
      "shorter prompts / fewer new tokens")


def make_spec(graphdef, config, *, slots: int, max_length: int, mesh: Mesh | None = None,
              sampling: Sampling = Sampling(), steps_per_call: int = 64, cache_dtype: str | None = None,
              return_logits: bool = False, stop_slots: int = 8, cache_layout: str | None = None) -> Spec:
  """The programs' shared shape of an engine with these settings (its slot length rounded to the kernel's pages)."""
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(config)))
  kernel = decode_kernel(config, cache_dtype, mesh)
  length = slot_length(max_length, "ragged" if cache_layout == "paged" else kernel)
  return Spec(graphdef, config, mesh, slots, length, cache_dtype, kernel, sampling.static_key(), stop_slots,
              steps_per_call, return_logits, cache_layout)


def abstract_programs(model, *, slots: int, max_length: int, prompt_len: int, prefill_group: int | None = None,
                      prefill_chunk: int | None = None, copies: int = 1, mesh: Mesh | None = None,
                      sampling: Sampling = Sampling(), steps_per_call: int = 64, cache_dtype: str | None = None,
                      return_logits: bool = False, stop_slots: int = 8) -> list[tuple[str, Any, tuple]]:
  """[(name, jitted program, abstract arguments)] of the prefill (`prefill_group` prompts of `prompt_len`
  positions, each into `copies` slots), insert and decode that an `Engine` with these settings runs, for
  ahead-of-time builds: `program.lower(*arguments).compile()` under the mesh, nothing allocated. `model` may
  be abstract (nnx.eval_shape); its weights are placed as the Engine places them."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                          sharding_lib.state_shardings(state, mesh))
  spec = make_spec(graphdef, model.config, slots=slots, max_length=max_length, mesh=mesh, sampling=sampling,
                   steps_per_call=steps_per_call, cache_dtype=cache_dtype, return_logits=return_logits,
                   stop_slots=stop_slots)
  P = min(prompt_len, spec.length)
  chunk = prefill_chunk if prefill_chunk and prefill_chunk < P else None
  return Programs(spec).jitted(params, prefill_group or slots, P, copies, chunk)


def _descending(buckets: Buckets, n: int, multiple: int) -> list[int]:
  """Bucket sizes from the one holding `n` down to `multiple`."""
  top = buckets.batch(n, multiple)
  sizes = [top]
  while sizes[-1] > multiple:
    sizes.append(max(multiple, (sizes[-1] // 2) // multiple * multiple))
  return sizes


class Engine:
  """Decode slots over one model (see the module docstring). `slots` x `max_length` positions of cache;
  `sampling` fixes the programs' sampling structure (greedy, top-k, nucleus; requests bring temperature and
  top-p values); `prefill_group` prompts at most per prefill, in `prefill_chunk`-token chunks if set;
  `leave_early` (default: while requests wait) makes a decode call return at the first finished row;
  `cache_layout` overrides the kernel's ("paged" or "split"). Not thread-safe."""

  def __init__(self, model, *, slots: int, max_length: int, mesh: Mesh | None = None,
               sampling: Sampling = Sampling(), steps_per_call: int = 64, prefill_group: int | None = None,
               prefill_chunk: int | None = None, buckets: Buckets = Buckets(), cache_dtype: str | None = None,
               return_logits: bool = False, stop_slots: int = 8, leave_early: bool | None = None,
               cache_layout: str | None = None):
    c = model.config
    self.config, self.mesh, self.buckets = c, mesh, buckets
    graphdef, state = nnx.split(model)
    self.spec = make_spec(graphdef, c, slots=slots, max_length=max_length, mesh=mesh, sampling=sampling,
                          steps_per_call=steps_per_call, cache_dtype=cache_dtype, return_logits=return_logits,
                          stop_slots=stop_slots, cache_layout=cache_layout)
    self.cache_dtype = self.spec.cache_dtype
    self.slots, self.length = slots, self.spec.length
    self.prefill_group = prefill_group or slots
    self.prefill_chunk = prefill_chunk
    self.leave_early = leave_early
    self.multiple = memory.data_shards(mesh)
    params = nnx.to_pure_dict(state)
    if mesh is not None:
      params = jax.device_put(params, sharding_lib.state_shardings(state, mesh))
    self.params = params
    self.programs = Programs(self.spec)
    self.cache = programs_lib.zeros_cache(self.spec)
    self.state = programs_lib.zeros_state(self.spec)
    self._live: list[_Live | None] = [None] * slots
    self._queue: list = []
    self._order = itertools.count()
    self.stats = Stats()

  # ---------------------------------------------------------------- queue

  def submit(self, request: Request) -> int:
    """Queues `request` (checked here: one line naming the request on bad input); returns its submission
    number (Result.seq)."""
    r, c = request, self.config
    what = f"request {r.id}" + (f" ({str(r.tag)[:60]})" if r.tag is not None else "")
    if not len(r.prompt):
      raise ValueError(f"{what}: the prompt is empty")
    if min(r.prompt) < 0 or max(r.prompt) >= c.vocab_size:
      raise ValueError(f"{what}: the prompt has a token id outside [0, {c.vocab_size})")
    if r.max_new_tokens < 0 or r.min_new_tokens < 0 or r.copies < 1:
      raise ValueError(f"{what}: max_new_tokens={r.max_new_tokens}, min_new_tokens={r.min_new_tokens} must be >= 0 "
                       f"and copies={r.copies} >= 1")
    if len(r.prompt) + r.max_new_tokens > self.length:
      raise ValueError(f"{what}: {len(r.prompt)} prompt + {r.max_new_tokens} new tokens exceed the slot length "
                       f"{self.length}")
    if len(set(r.stop_ids)) > self.spec.stop_slots:
      raise ValueError(f"{what}: {len(set(r.stop_ids))} stop ids; at most {self.spec.stop_slots}")
    seq = next(self._order)
    heapq.heappush(self._queue, [r.priority, seq, r, 0, r.copies])
    return seq

  @property
  def pending(self) -> int:
    """Queued copies not yet in a slot."""
    return sum(e[4] for e in self._queue)

  @property
  def active(self) -> int:
    return sum(s is not None for s in self._live)

  def idle(self) -> bool:
    return not self._queue and not self.active

  def run(self, requests: Iterable[Request]) -> list[Result]:
    """Submits `requests`, decodes until all are done; results in submission order (copies in order)."""
    requests = list(requests)
    seqs = [self.submit(r) for r in requests]
    out: dict[tuple[int, int], Result] = {}
    while not self.idle():
      for res in self.step():
        out[(res.seq, res.copy)] = res
    return [out[(q, j)] for q, r in zip(seqs, requests) for j in range(r.copies)]

  def step(self) -> list[Result]:
    """Refills free slots from the queue, then one decode call; returns the copies finished meanwhile."""
    done = self._refill()
    if self.active:
      done += self._decode()
    return done

  def release(self) -> None:
    """Drops the cache (e.g. before a training update); the engine cannot decode afterwards."""
    self.cache = self.state = None

  # ---------------------------------------------------------------- prefill + insert

  def _take(self, free: int) -> list[tuple[Request, int, int]]:
    """Requests (their next copies) for at most `free` slots from the queue's head: as many as the largest
    prefill bucket, up to `prefill_group`, that the queue fills (no padding rows but in the smallest)."""
    rows = min(self.prefill_group, len(self._queue), free)
    sizes = _descending(self.buckets, self.prefill_group, self.multiple)
    rows = next((g for g in sizes if g <= rows), sizes[-1])
    group, used = [], 0
    while self._queue and len(group) < rows and used < free:
      entry = heapq.heappop(self._queue)
      _, seq, r, first, left = entry
      k = min(left, free - used)
      group.append((r, seq, first, k))
      used += k
      if left > k:  # the rest of its copies wait, still at the head
        entry[3], entry[4] = first + k, left - k
        heapq.heappush(self._queue, entry)
    return group

  def _refill(self) -> list[Result]:
    finished = []
    free = [b for b, s in enumerate(self._live) if s is None]
    while free and self._queue:
      group = self._take(len(free))
      for r, seq, first, k in group:
        if r.max_new_tokens == 0:
          finished += [Result(r, first + j, [], [], "length", self._empty_logits(), seq) for j in range(k)]
      group = [g for g in group if g[0].max_new_tokens > 0]
      if not group:
        continue
      used = sum(g[3] for g in group)
      dests, free = free[:used], free[used:]
      finished += self._prefill_insert(group, dests)
      free += [b for b in dests if self._live[b] is None]  # finished at their first token
    return finished

  def _empty_logits(self):
    return np.zeros((0, self.config.vocab_size), np.float32) if self.spec.return_logits else None

  def _prefill_insert(self, group, dests) -> list[Result]:
    s, c = self.spec, self.config
    t0 = time.perf_counter()
    G = self.buckets.batch(len(group), self.multiple)
    longest = max(len(g[0].prompt) for g in group)
    P = min(self.buckets.prompt(longest), self.length)
    C = programs_lib.bucket(max(g[3] for g in group), 1)
    B, V, M = self.slots, c.vocab_size, s.stop_slots
    tokens = np.zeros((G, P), np.int32)
    lengths = np.ones((G,), np.int32)
    dest = np.full((G, C), B, np.int32)
    n = G * C
    src, dest_n = np.zeros((n,), np.int32), np.full((n,), B, np.int32)
    lengths_n, request_n, seed_n, budget_n, min_new_n = (np.zeros((n,), np.int32) for _ in range(5))
    temperature_n, top_p_n = np.zeros((n,), np.float32), np.ones((n,), np.float32)
    stops_n = np.full((n, M), V, np.int32)
    placed = []  # (request, seq, copy, slot, group row, flat index)
    it = iter(dests)
    for g, (r, seq, first, k) in enumerate(group):
      tokens[g, :len(r.prompt)] = r.prompt
      lengths[g] = len(r.prompt)
      stops = sorted({int(x) for x in r.stop_ids})
      for j in range(k):
        slot, i = next(it), g * C + j
        dest[g, j] = dest_n[i] = slot
        src[i], lengths_n[i], request_n[i], seed_n[i] = g, len(r.prompt), r.id + first + j, r.seed
        budget_n[i], min_new_n[i] = r.max_new_tokens, r.min_new_tokens
        temperature_n[i], top_p_n[i] = r.temperature, r.top_p
        stops_n[i, :len(stops)] = stops
        placed.append((r, seq, first + j, slot, g, i))
    chunk = self.prefill_chunk if self.prefill_chunk and self.prefill_chunk < P else None
    prefill = self.programs.prefill(self.params, G, P, C, chunk)
    insert = self.programs.insert(G, n)
    put = self._put
    self.cache, logits = prefill(self.params, self.cache, put(tokens), put(lengths), put(dest))
    self.state, tok, lp, done = insert(self.state, logits, *map(put, (src, dest_n, lengths_n, request_n, seed_n,
                                                                         temperature_n, top_p_n, budget_n, min_new_n,
                                                                         stops_n)))
    tok, lp, done = jax.device_get((tok, lp, done))
    logits = np.asarray(jax.device_get(logits)) if s.return_logits else None
    self.stats.prefill_calls += 1
    self.stats.prefill_rows += len(group)
    self.stats.prefill_tokens += sum(len(g[0].prompt) for g in group)
    finished = []
    for r, seq, copy, slot, g, i in placed:
      live = _Live(r, seq, copy, [int(tok[i])], [float(lp[i])], [logits[g]] if logits is not None else None)
      self.stats.generated_tokens += 1
      if done[i]:
        finished.append(self._finish(live, "stop" if int(tok[i]) in set(r.stop_ids) else "length"))
      else:
        self._live[slot] = live
    self.stats.prefill_seconds += time.perf_counter() - t0
    return finished

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return x
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def _finish(self, live: _Live, reason: str) -> Result:
    logits = None
    if live.logits is not None:
      logits = np.stack(live.logits).astype(np.float32) if live.logits else self._empty_logits()
    return Result(live.request, live.copy, live.tokens, live.logprobs, reason, logits, live.seq)

  # ---------------------------------------------------------------- decode

  def _decode(self) -> list[Result]:
    s = self.spec
    t0 = time.perf_counter()
    remaining = max(live.request.max_new_tokens - len(live.tokens) for live in self._live if live is not None)
    limit = min(s.steps, remaining)
    leave = self.leave_early if self.leave_early is not None else bool(self._queue)
    decode = self.programs.decode(self.params)
    out = decode(self.params, self.cache, self.state, self._put(np.int32(limit)), self._put(np.bool_(leave)))
    self.cache, self.state = out[0], out[1]
    tokens, lps, logits, emitted, finished, stopped = jax.device_get(out[2:])
    steps = int(emitted.max()) if emitted.size else 0
    self.stats.decode_calls += 1
    self.stats.decode_steps += steps
    self.stats.slot_steps += steps * self.slots
    self.stats.live_slot_steps += int(emitted.sum())
    self.stats.generated_tokens += int(emitted.sum())
    done = []
    for b, live in enumerate(self._live):
      if live is None:
        continue
      k = int(emitted[b])
      live.tokens += tokens[b, :k].tolist()
      live.logprobs += lps[b, :k].tolist()
      if live.logits is not None:
        live.logits += list(np.asarray(logits[b, :k]))
      if finished[b]:
        done.append(self._finish(live, "stop" if stopped[b] else "length"))
        self._live[b] = None
    self.stats.decode_seconds += time.perf_counter() - t0
    return done

  # ---------------------------------------------------------------- ahead-of-time warm-up

  def warmup(self, prompt_lengths: Sequence[int] = (), copies: int = 1) -> int:
    """Compiles, ahead of time, the decode program and the prefill and insert programs of every prefill
    group size for the prompt buckets that `prompt_lengths` fall in (with `copies` slots per prompt), so
    that no request waits for a compile; returns how many programs were compiled."""
    before = programs_lib.compilation_count()
    self.programs.decode(self.params)
    C = programs_lib.bucket(copies, 1)
    for P in sorted({min(self.buckets.prompt(n), self.length) for n in prompt_lengths}):
      chunk = self.prefill_chunk if self.prefill_chunk and self.prefill_chunk < P else None
      for G in _descending(self.buckets, self.prefill_group, self.multiple):
        self.programs.prefill(self.params, G, P, C, chunk)
        self.programs.insert(G, G * C)
    return programs_lib.compilation_count() - before
