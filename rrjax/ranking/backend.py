"""The model side of the reranking loops: `complete` (listwise) and `score` (Rank1) over `rrjax.generate`."""

from __future__ import annotations

import collections
import math
import time
from typing import Sequence

import numpy as np

from rrjax import decode
from rrjax.ranking import rerank_loop as loop
from rrjax.ranking.pointwise import rank1_label_ids, rank1_reasoning


class ModelBackend:
  """Generation settings come from `settings` (a RerankSettings: max/min new tokens, temperature, top_p,
  seed, batch_size, window, prompt_mode); it also counts the seconds spent generating."""

  def __init__(self, model, tokenizer, settings, *, mesh=None):
    self.model, self.tokenizer, self.settings, self.mesh = model, tokenizer, settings, mesh
    self.generate_seconds = 0.0
    self.calls = 0
    self.engine: dict = {}  # the engine's shapes, budget and counters over all calls (see engine_summary)

  def _generate(self, ids, **kw) -> decode.Generation:
    s = self.settings
    kw = {"temperature": s.temperature, "top_p": s.top_p, "stop_ids": self.tokenizer.stop_ids, **kw}
    t0 = time.perf_counter()
    # A new seed per call, so sampled rounds do not replay one random stream. Without a batch size, the slots
    # and prefill group are the most the memory budget holds.
    gen = decode.generate(self.model, ids, seed=s.seed + self.calls, mesh=self.mesh,
                          batch_size=s.batch_size or "auto", **kw)
    self.generate_seconds += time.perf_counter() - t0
    self.calls += 1
    self._account(gen.engine or {})
    return gen

  def _account(self, report: dict) -> None:
    """Counters add up; shapes and estimates keep their largest value, the budget its smallest."""
    e = self.engine
    for key, value in report.items():
      if value is None:
        continue
      if key == "budget_bytes":
        e[key] = min(e.get(key, value), value)
      elif key in ("slots", "prefill_group", "prefill_chunk", "slot_length", "estimate_bytes"):
        e[key] = max(e.get(key, value), value)
      elif key != "occupancy":
        e[key] = e.get(key, 0) + value
    if e.get("slot_steps"):
      e["occupancy"] = e["live_slot_steps"] / e["slot_steps"]

  def _answer_budget(self, n: int) -> int:
    """Upstream's rank_GPT (plain) budget: exactly the tokens of `[1] > [2] > ... > [n]`."""
    return len(self.tokenizer.encode(" > ".join(f"[{i + 1}]" for i in range(n))))

  def complete(self, prompts: Sequence[str]) -> list[loop.Completion]:
    s = self.settings
    ids = self.tokenizer.encode_batch(list(prompts))
    groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
      if s.prompt_mode == "plain":
        n = getattr(p, "end", 0) - getattr(p, "start", 0) or s.window
        budget = self._answer_budget(n)
        groups[(budget, budget)].append(i)
      else:
        groups[(s.max_new_tokens, s.min_new_tokens)].append(i)
    out: list[loop.Completion | None] = [None] * len(prompts)
    for (max_new, min_new), rows in groups.items():
      gen = self._generate([ids[i] for i in rows], max_new_tokens=max_new, min_new_tokens=min_new)
      for r, i in enumerate(rows):
        text = self.tokenizer.decode(gen.tokens[r], skip_special_tokens=True)
        out[i] = loop.Completion(text, len(ids[i]), gen.lengths[r], gen.finish_reasons[r])
    return out

  def score(self, prompts: Sequence[str]) -> list[loop.PointwiseScore]:
    """Rank1: reason, then score the token after `</think>` restricted to true/false."""
    s = self.settings
    true_id, false_id = rank1_label_ids(self.tokenizer)
    ids = self.tokenizer.encode_batch(list(prompts))
    gen = self._generate(ids, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens)
    reasoning = [rank1_reasoning(self.tokenizer.decode(t, skip_special_tokens=True)) for t in gen.tokens]
    # One forward pass over prompt + reasoning + `</think>`: the last position's logits are the label's.
    full = [p + self.tokenizer.encode(text) for p, (text, _) in zip(ids, reasoning)]
    last = self._generate(full, max_new_tokens=1, temperature=0.0, stop_ids=(), return_logits=True,
                          buckets=decode.Buckets(min_new_tokens=1))
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
