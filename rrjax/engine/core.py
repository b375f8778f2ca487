"""The continuous-batching engine: a fixed number of decode slots, refilled from a queue as rows finish.

    engine = Engine(model, EngineConfig(slots=8, length=4096))  # or one rrjax.engine.plan sizes to a budget
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
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rrjax import sharding as sharding_lib
from rrjax.engine import memory
from rrjax.engine import programs as programs_lib
from rrjax.engine.config import EngineConfig, descending
from rrjax.engine.programs import Inserted, Programs


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


def abstract_programs(model, config: EngineConfig, *, prompt_len: int, mesh: Mesh | None = None, copies: int = 1
                      ) -> list[tuple[str, Any, tuple]]:
  """[(name, jitted program, abstract arguments)] of the prefill (`config.prefill_group` prompts of
  `prompt_len` positions, each into `copies` slots), insert and decode that an `Engine` with this config runs,
  for ahead-of-time builds: `program.lower(*arguments).compile()` under the mesh, nothing allocated. `model`
  may be abstract (nnx.eval_shape); its weights are placed as the Engine places them."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                          sharding_lib.state_shardings(state, mesh))
  config = config.resolved(model.config, mesh)
  P = min(prompt_len, config.length)
  return Programs(config.spec(graphdef, model.config, mesh)).jitted(params, config.prefill_group, P, copies,
                                                                     config.chunk_for(P))


class Engine:
  """Decode slots over one model (see the module docstring), shaped by `config` (an EngineConfig with its
  slots set: rrjax.engine.plan makes one from a memory budget); `leave_early` (default: while requests wait)
  makes a decode call return at the first finished row. Not thread-safe."""

  def __init__(self, model, config: EngineConfig, mesh: Mesh | None = None, *, leave_early: bool | None = None):
    if config.slots < 1 or config.length < 1:
      raise ValueError(f"EngineConfig: slots={config.slots} and length={config.length} must be >= 1 (rrjax.engine.plan "
                       "chooses them from a memory budget)")
    self.model_config, self.mesh = model.config, mesh
    self.config = config.resolved(model.config, mesh)
    graphdef, state = nnx.split(model)
    self.spec = self.config.spec(graphdef, model.config, mesh)
    self.slots, self.length = self.config.slots, self.config.length
    self.leave_early = leave_early
    self.multiple = memory.data_shards(mesh)
    params = nnx.to_pure_dict(state)
    if mesh is not None:
      params = jax.device_put(params, sharding_lib.state_shardings(state, mesh))
    self.params = params
    self.programs = Programs(self.spec)
    self.cache = programs_lib.zeros_cache(self.spec)
    self.state = programs_lib.zeros_state(self.spec)
    self._live: list[_Live | None] = [None] * self.slots
    self._queue: list = []
    self._order = itertools.count()
    self.stats = Stats()

  # ---------------------------------------------------------------- queue

  def submit(self, request: Request) -> int:
    """Queues `request` (checked here: one line naming the request on bad input); returns its submission
    number (Result.seq)."""
    r, c = request, self.model_config
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

  def cancel(self, drop) -> list[Request]:
    """Removes the queued requests (not yet in a slot) for which `drop(request)` is true; returns them. Rows
    already decoding run on (a server drops their answers)."""
    dropped = [e[2] for e in self._queue if drop(e[2])]
    if dropped:
      self._queue = [e for e in self._queue if not drop(e[2])]
      heapq.heapify(self._queue)
    return dropped

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
    rows = min(self.config.prefill_group, len(self._queue), free)
    sizes = descending(self.config.buckets, self.config.prefill_group, self.multiple)
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
    return np.zeros((0, self.model_config.vocab_size), np.float32) if self.spec.return_logits else None

  def _prefill_insert(self, group, dests) -> list[Result]:
    t0 = time.perf_counter()
    buckets = self.config.buckets
    G = buckets.batch(len(group), self.multiple)
    P = min(buckets.prompt(max(len(g[0].prompt) for g in group)), self.length)
    C = programs_lib.bucket(max(g[3] for g in group), 1)
    tokens = np.zeros((G, P), np.int32)
    lengths = np.ones((G,), np.int32)
    dest = np.full((G, C), self.slots, np.int32)
    new = Inserted.empty(G * C, self.spec)
    placed = []  # (request, seq, copy, slot, group row, flat index)
    it = iter(dests)
    for g, (r, seq, first, k) in enumerate(group):
      tokens[g, :len(r.prompt)] = r.prompt
      lengths[g] = len(r.prompt)
      stops = sorted({int(x) for x in r.stop_ids})
      for j in range(k):
        slot, i = next(it), g * C + j
        dest[g, j] = new.dest_n[i] = slot
        new.src_n[i], new.lengths_n[i], new.request_n[i], new.seed_n[i] = g, len(r.prompt), r.id + first + j, r.seed
        new.budget_n[i], new.min_new_n[i] = r.max_new_tokens, r.min_new_tokens
        new.temperature_n[i], new.top_p_n[i] = r.temperature, r.top_p
        new.stops_nxM[i, :len(stops)] = stops
        placed.append((r, seq, first + j, slot, g, i))
    prefill = self.programs.prefill(self.params, G, P, C, self.config.chunk_for(P))
    insert = self.programs.insert(G, G * C)
    self.cache, logits = prefill(self.params, self.cache, *map(self._put, (tokens, lengths, dest)))
    self.state, tok, lp, done = insert(self.state, logits, jax.tree.map(self._put, new))
    tok, lp, done = jax.device_get((tok, lp, done))
    logits = np.asarray(jax.device_get(logits)) if self.spec.return_logits else None
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
    self.cache, self.state = out.cache, out.state
    tokens, lps, logits, emitted, finished, stopped = jax.device_get(
        (out.tokens_BxK, out.logprobs_BxK, out.logits_BxKxV, out.emitted_B, out.finished_B, out.stopped_B))
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
    for P in sorted({min(self.config.buckets.prompt(n), self.length) for n in prompt_lengths}):
      for G in descending(self.config.buckets, self.config.prefill_group, self.multiple):
        self.programs.prefill(self.params, G, P, C, self.config.chunk_for(P))
        self.programs.insert(G, G * C)
    return programs_lib.compilation_count() - before
