"""The model side of the reranking loops on rrjax.engine: `complete` (lockstep listwise, full-list),
`submit`/`poll` (the async schedule's Completer) and `score` (Rank1)."""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from rrjax import decode
from rrjax.engine import config as engine_config
from rrjax.engine import core as engine_lib
from rrjax.engine.config import EngineConfig
from rrjax.ranking import rerank_loop as loop
from rrjax.ranking.pointwise import rank1_label_ids, rank1_reasoning
from rrjax.sampling import Sampling

PROMPT_ROOM = 1.25  # slot prompt room over the longest prompt seen: later windows of a query may be longer
_SHAPES = ("slots", "prefill_group", "prefill_chunk", "slot_length", "estimate_bytes")
# Rank1's scoring pass: one greedy step over prompt + reasoning + `</think>`, its logits kept.
SCORING = EngineConfig(return_logits=True, buckets=decode.Buckets(min_new_tokens=1))


def sampling(settings) -> Sampling:
  s = settings
  return Sampling(s.temperature, s.sampling_top_k, s.top_p, s.min_p)


def listwise_engine(model, settings, *, prompt_tokens: int, max_new_tokens: int, num_slots: int, mesh=None,
                    memory_limit_bytes: int | None = None, what: str = "a window") -> tuple[EngineConfig, int]:
  """(engine config, prompt positions) of the engine that serves windows of up to `prompt_tokens` (the prompt
  positions: with PROMPT_ROOM, bucketed) and `max_new_tokens`, for `num_slots` windows in flight:
  `settings.batch_size` slots, or as many as the memory budget (`memory_limit_bytes`, else the devices')
  holds. rrjax.rerank.preflight compiles the programs of the same config."""
  want = EngineConfig(slots=settings.batch_size or 0, sampling=sampling(settings))
  P = want.buckets.prompt(math.ceil(prompt_tokens * PROMPT_ROOM))
  want = dataclasses.replace(want, length=P + want.buckets.new_tokens(max_new_tokens))
  return engine_config.plan(model, want, prompt_len=P, mesh=mesh, num_slots=num_slots,
                            memory_limit_bytes=memory_limit_bytes, what=what), P


class ModelBackend:
  """Generation settings come from `settings` (a RerankSettings: max/min new tokens, temperature, top_p,
  seed, batch_size, window, prompt_mode). Listwise windows run on one engine kept across calls (recreated
  with longer slots when a prompt outgrows them), its slots and prefill group chosen from the memory budget
  unless `batch_size` says; `eager` (the async schedule) makes each decode call return at the first
  finished window. `budget(prompt)`, when given, scripts each window's generated length (stop ids off: the
  benchmarks' fixed-length chains). `engine` collects the engines' shapes, budget and counters."""

  def __init__(self, model, tokenizer, settings, *, mesh=None, eager: bool = False,
               budget: Callable[[str], int] | None = None, concurrency: int | None = None):
    self.model, self.tokenizer, self.settings, self.mesh = model, tokenizer, settings, mesh
    self.eager, self.budget, self.concurrency = eager, budget, concurrency
    self.generate_seconds = 0.0
    self.calls = 0
    self.engine: dict = {}
    self._engine: engine_lib.Engine | None = None
    self._waiting: list[engine_lib.Request] = []
    self._ids: dict[int, int] = {}  # request id -> times used (ids stay unique when a window repeats)

  # ---------------------------------------------------------------- accounting

  def _account(self, report: dict) -> None:
    """Counters add up; shapes and estimates keep their largest value, the budget its smallest."""
    e = self.engine
    for key, value in report.items():
      if value is None:
        continue
      if key == "budget_bytes":
        e[key] = min(e.get(key, value), value)
      elif key in _SHAPES:
        e[key] = max(e.get(key, value), value)
      elif key != "occupancy":
        e[key] = e.get(key, 0) + value
    if e.get("slot_steps"):
      e["occupancy"] = e["live_slot_steps"] / e["slot_steps"]

  def close(self) -> None:
    """Accounts for and drops the listwise engine (its cache is freed)."""
    if self._engine is not None:
      self._account(self._engine.stats.as_dict())
      self._engine.release()
      self._engine = None

  # ---------------------------------------------------------------- listwise on a kept engine

  def _budget(self, prompt, max_new_tokens: int | None = None) -> tuple[int, int, tuple[int, ...]]:
    """(max_new, min_new, stop ids) of a window; `max_new_tokens` (a server request's) overrides the settings'."""
    s = self.settings
    if self.budget is not None:
      n = int(self.budget(prompt))
      return n, n, ()
    if s.prompt_mode == "plain":
      n = getattr(prompt, "end", 0) - getattr(prompt, "start", 0) or s.window
      budget = self._answer_budget(n)
      return budget, budget, tuple(self.tokenizer.stop_ids)
    max_new = s.max_new_tokens if max_new_tokens is None else max_new_tokens
    return max_new, min(s.min_new_tokens, max_new), tuple(self.tokenizer.stop_ids)

  def _request_id(self, prompt) -> int:
    """A window's sampling stream: from its query and span, so that it does not depend on the schedule."""
    key = f"{getattr(prompt, 'qid', '')}\t{getattr(prompt, 'start', '')}\t{getattr(prompt, 'end', '')}\t{prompt}"
    base = zlib.crc32(key.encode()) & 0x3FFFFFFF
    used = self._ids.get(base, 0)
    self._ids[base] = used + 1
    return (base + used) & 0x7FFFFFFF

  def submit(self, prompt, priority: Any = 0, max_new_tokens: int | None = None) -> None:
    s = self.settings
    ids = self.tokenizer.encode(prompt)
    max_new, min_new, stops = self._budget(prompt, max_new_tokens)
    request = engine_lib.Request(ids, max_new, min_new, stops, s.temperature, s.top_p, s.seed,
                                 id=self._request_id(prompt), priority=priority, tag=prompt)
    eng = self._engine
    if eng is not None and not self._waiting and len(ids) + max_new <= eng.length:
      eng.submit(request)
    else:  # no engine yet, or its slots are too short: wait for the next one (the current one drains)
      self._waiting.append(request)

  def cancel(self, drop: Callable[[Any], bool]) -> int:
    """Drops the queued windows (not yet decoding) whose prompt `drop(prompt)` selects; returns how many."""
    before = len(self._waiting)
    self._waiting = [r for r in self._waiting if not drop(r.tag)]
    n = before - len(self._waiting)
    if self._engine is not None:
      n += len(self._engine.cancel(lambda r: drop(r.tag)))
    return n

  @property
  def queued(self) -> int:
    """Windows submitted and not yet in a decode slot."""
    return len(self._waiting) + (self._engine.pending if self._engine is not None else 0)

  @property
  def live_engine(self) -> engine_lib.Engine | None:
    return self._engine

  def _new_engine(self) -> engine_lib.Engine:
    longest = max(self._waiting, key=lambda r: len(r.prompt) + r.max_new_tokens)
    what = f"window {getattr(longest.tag, 'qid', '?')}[{getattr(longest.tag, 'start', '?')}:" \
           f"{getattr(longest.tag, 'end', '?')}] ({len(longest.prompt)} prompt tokens, {longest.max_new_tokens} new)"
    config, _ = listwise_engine(self.model, self.settings, prompt_tokens=len(longest.prompt),
                                max_new_tokens=max(r.max_new_tokens for r in self._waiting),
                                num_slots=max(self.concurrency or 0, len(self._waiting)), mesh=self.mesh, what=what)
    self._account({"budget_bytes": config.estimate.limit, "slots": config.slots, "prefill_group": config.prefill_group,
                   "prefill_chunk": config.prefill_chunk, "slot_length": config.length,
                   "estimate_bytes": config.estimate.total, "engines": 1})
    return engine_lib.Engine(self.model, config, self.mesh, leave_early=True if self.eager else None)

  def poll(self) -> list[tuple[Any, loop.Completion]]:
    """Decodes until at least one pending window is answered; [] when none is pending."""
    t0 = time.perf_counter()
    out = []
    while not out:
      eng = self._engine
      if self._waiting and (eng is None or eng.idle()):
        self.close()
        eng = self._engine = self._new_engine()
        for r in self._waiting:
          eng.submit(r)
        self._waiting = []
      if eng is None or eng.idle():
        break
      for res in eng.step():
        text = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
        out.append((res.request.tag, loop.Completion(text, len(res.request.prompt), len(res.tokens),
                                                     res.finish_reason)))
    self.generate_seconds += time.perf_counter() - t0
    return out

  def complete(self, prompts: Sequence[str]) -> list[loop.Completion]:
    """Every prompt answered (lockstep rounds, full-list): all queued at once on the kept engine."""
    for i, p in enumerate(prompts):
      self.submit(p, (0, i))
    self.calls += 1
    answers: dict[int, loop.Completion] = {}
    index = {id(p): i for i, p in enumerate(prompts)}
    while len(answers) < len(prompts):
      got = self.poll()
      if not got:
        raise RuntimeError(f"the engine answered {len(answers)} of {len(prompts)} prompts")
      answers.update((index[id(p)], c) for p, c in got)
    return [answers[i] for i in range(len(prompts))]

  # ---------------------------------------------------------------- Rank1

  def _generate(self, ids, engine: EngineConfig = EngineConfig(), **kw) -> decode.Generation:
    s = self.settings
    kw = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.sampling_top_k, "min_p": s.min_p,
          "stop_ids": self.tokenizer.stop_ids, **kw}
    t0 = time.perf_counter()
    # A new seed per call, so sampled rounds do not replay one random stream. Without a batch size, the slots
    # and prefill group are the most the memory budget holds.
    gen = decode.generate(self.model, ids, seed=s.seed + self.calls, mesh=self.mesh,
                          engine=dataclasses.replace(engine, slots=s.batch_size or 0), **kw)
    self.generate_seconds += time.perf_counter() - t0
    self.calls += 1
    self._account(gen.engine or {})
    return gen

  def _answer_budget(self, n: int) -> int:
    """Upstream's rank_GPT (plain) budget: exactly the tokens of `[1] > [2] > ... > [n]`."""
    return len(self.tokenizer.encode(" > ".join(f"[{i + 1}]" for i in range(n))))

  def score(self, prompts: Sequence[str]) -> list[loop.PointwiseScore]:
    """Rank1: reason, then score the token after `</think>` restricted to true/false."""
    s = self.settings
    true_id, false_id = rank1_label_ids(self.tokenizer)
    ids = self.tokenizer.encode_batch(list(prompts))
    if self.budget is not None:  # scripted chain lengths (benchmarks): stop ids off
      n = [int(self.budget(p)) for p in prompts]
      gen = self._generate(ids, max_new_tokens=n, min_new_tokens=n, stop_ids=())
    else:
      gen = self._generate(ids, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens)
    reasoning = [rank1_reasoning(self.tokenizer.decode(t, skip_special_tokens=True)) for t in gen.tokens]
    # One forward pass over prompt + reasoning + `</think>`: the last position's logits are the label's.
    full = [p + self.tokenizer.encode(text) for p, (text, _) in zip(ids, reasoning)]
    last = self._generate(full, SCORING, max_new_tokens=1, temperature=0.0, stop_ids=())
    out = []
    for i, (_, source) in enumerate(reasoning):
      logits_V = last.logits[i][0]
      margin = float(logits_V[true_id]) - float(logits_V[false_id])
      if math.isfinite(margin):
        p = float(1.0 / (1.0 + np.exp(-np.float64(margin))))
      else:
        p, source = 0.5, "failed"
      out.append(loop.PointwiseScore(p, len(ids[i]), gen.lengths[i], source))
    return out
