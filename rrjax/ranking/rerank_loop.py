"""Reranking loops without a model: sliding windows in lockstep, full-list, and Rank1 pointwise.

The model enters through a callable. Listwise modes take `complete(prompts) -> texts`: `prompts` is a list
of `WindowPrompt` (a `str` that also carries the qid, window span and docids, for scripted completions
that want them); the answers are strings or `Completion`s (text plus token counts for the report).
Pointwise mode takes `score(prompts) -> PointwiseScore`s over Rank1 prompts.

Lockstep (upstream `sliding_windows_batched`): round k sends the k-th window of every query in one
`complete` call; each window's permutation is applied before that query's next window is built. A query
with fewer candidates gets upstream's clamped windows and sits out the rounds it has no window for.

Async (`rerank_listwise_async`): a state machine per query over a `Completer` (submit / poll). As soon as a
query's window is answered, its permutation is applied and its next window is queued, ahead of queries not
started yet (most windows left first), so decode slots stay full and queries finish early. Every window
depends only on its own query's previous one, so under greedy decoding both schedules give the same run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

from rrjax.ranking.parse import parse_permutation_with_source
from rrjax.ranking.pointwise import rank1_passage, rank1_prompt
from rrjax.ranking.prompt import build_prompt
from rrjax.ranking.window import apply_permutation, full_list_window, sliding_windows

RERANK_MODES = ("listwise", "full", "pointwise")
SCHEDULES = ("async", "lockstep")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A first-stage hit: its id, its score (the slot's score, which stays with the slot) and its passage."""

  docid: str
  score: float
  doc: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Query:
  qid: str
  text: str
  candidates: tuple[Candidate, ...]


class WindowPrompt(str):
  """A window's prompt text, carrying `qid`, `start`, `end` and the window's `docids` in prompt order."""

  qid: str
  start: int
  end: int
  docids: tuple[str, ...]

  def __new__(cls, text: str, *, qid: str, start: int, end: int, docids: Sequence[str]):
    obj = super().__new__(cls, text)
    obj.qid, obj.start, obj.end, obj.docids = qid, start, end, tuple(docids)
    return obj


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  prompt_tokens: int = 0
  generated_tokens: int = 0
  finish_reason: str = ""


@dataclasses.dataclass(frozen=True)
class WindowLog:
  """One window of one query: its span, token counts and the parser source (see rrjax.ranking.parse)."""

  start: int
  end: int
  prompt_tokens: int
  generated_tokens: int
  finish_reason: str
  parser: str


@dataclasses.dataclass(frozen=True)
class PointwiseScore:
  """Rank1's p(true) / (p(true) + p(false)) for one passage, with its tokens and source."""

  score: float
  prompt_tokens: int = 0
  generated_tokens: int = 0
  source: str = "think_end"


@dataclasses.dataclass(frozen=True)
class Ranked:
  """A reranked query: candidates in the new order (slot scores kept), and what each step did."""

  qid: str
  candidates: tuple[Candidate, ...]
  windows: tuple[WindowLog, ...] = ()
  pointwise: Mapping[str, PointwiseScore] | None = None  # by docid, pointwise mode only


def _completion(out: str | Completion) -> Completion:
  if isinstance(out, Completion):
    return out
  if isinstance(out, str):
    return Completion(str(out))
  raise TypeError(f"complete() must return str or Completion items, got {type(out).__name__}")


def rerank_listwise(queries: Sequence[Query], complete: Callable[[list[WindowPrompt]], Sequence[str | Completion]],
                    tokenizer, *, window: int = 20, stride: int = 10, top_k: int = 100,
                    max_passage_tokens: int | None = 512, prompt_mode: str = "reasoning", full_list: bool = False,
                    progress: Callable[[int], None] | None = None) -> list[Ranked]:
  """Sliding-window (or, with full_list, one-window) reranking of each query's top-k, in lockstep.

  `progress(n)` is called after each round with the number of windows it ranked.
  """
  if top_k <= 0:
    raise ValueError(f"top_k must be positive, got {top_k}")
  states = [list(q.candidates[:top_k]) for q in queries]  # upstream keeps only the top retrieval_num
  plans = [full_list_window(len(s)) if full_list else sliding_windows(len(s), window, stride) for s in states]
  logs: list[list[WindowLog]] = [[] for _ in queries]
  for k in range(max((len(p) for p in plans), default=0)):
    active = [i for i, plan in enumerate(plans) if k < len(plan)]
    prompts = []
    for i in active:
      start, end = plans[i][k]
      docs = states[i][start:end]
      text = build_prompt(queries[i].text, [c.doc for c in docs], tokenizer,
                          max_passage_tokens=max_passage_tokens, mode=prompt_mode)
      prompts.append(WindowPrompt(text, qid=queries[i].qid, start=start, end=end, docids=[c.docid for c in docs]))
    outs = list(complete(prompts))
    if len(outs) != len(prompts):
      raise ValueError(f"complete() returned {len(outs)} answers for {len(prompts)} prompts")
    for i, prompt, out in zip(active, prompts, outs):
      out = _completion(out)
      perm, source = parse_permutation_with_source(out.text, prompt.end - prompt.start)
      states[i] = apply_permutation(states[i], prompt.start, prompt.end, perm)
      logs[i].append(WindowLog(prompt.start, prompt.end, out.prompt_tokens, out.generated_tokens,
                               out.finish_reason, source))
    if progress is not None:
      progress(len(active))
  return [Ranked(q.qid, tuple(s), tuple(log)) for q, s, log in zip(queries, states, logs)]


class Completer(Protocol):
  """The model side of the async schedule. `submit(prompt, priority)` queues a prompt (smaller priorities
  first); `poll()` returns the (prompt, answer) pairs finished since the last call (answers are strings or
  Completions), waiting for at least one while any prompt is pending."""

  def submit(self, prompt: WindowPrompt, priority: Any) -> None: ...

  def poll(self) -> list[tuple[WindowPrompt, str | Completion]]: ...


class BatchCompleter:
  """A Completer over a `complete(prompts)` callable: each poll answers every pending prompt in one call
  (in priority order), so the async loop can drive scripted completions."""

  def __init__(self, complete: Callable[[list[WindowPrompt]], Sequence[str | Completion]]):
    self.complete, self.pending, self.calls = complete, [], []

  def submit(self, prompt: WindowPrompt, priority: Any) -> None:
    self.pending.append((priority, len(self.pending), prompt))

  def poll(self) -> list[tuple[WindowPrompt, str | Completion]]:
    prompts = [p for _, _, p in sorted(self.pending, key=lambda e: (e[0], e[1]))]
    self.pending = []
    if not prompts:
      return []
    outs = list(self.complete(prompts))
    if len(outs) != len(prompts):
      raise ValueError(f"complete() returned {len(outs)} answers for {len(prompts)} prompts")
    self.calls.append(len(prompts))
    return list(zip(prompts, outs))


class QueryWindows:
  """One query's windows as a state machine (the async schedule's unit): `prompt()` builds the next window's
  prompt from the current order, `answer(prompt, out)` applies its permutation; `done` after the last window,
  then `ranked()`. Each window depends only on this query's previous ones, so a query's ranking does not
  depend on what else is scheduled."""

  def __init__(self, query: Query, tokenizer, *, window: int = 20, stride: int = 10, top_k: int = 100,
               max_passage_tokens: int | None = 512, prompt_mode: str = "reasoning", full_list: bool = False):
    if top_k <= 0:
      raise ValueError(f"top_k must be positive, got {top_k}")
    self.query, self.tokenizer = query, tokenizer
    self.max_passage_tokens, self.prompt_mode = max_passage_tokens, prompt_mode
    self.state = list(query.candidates[:top_k])
    self.plan = full_list_window(len(self.state)) if full_list else sliding_windows(len(self.state), window, stride)
    self.logs: list[WindowLog] = []

  @property
  def left(self) -> int:
    """Windows not answered yet."""
    return len(self.plan) - len(self.logs)

  @property
  def done(self) -> bool:
    return not self.left

  def prompt(self) -> WindowPrompt:
    start, end = self.plan[len(self.logs)]
    docs = self.state[start:end]
    text = build_prompt(self.query.text, [c.doc for c in docs], self.tokenizer,
                        max_passage_tokens=self.max_passage_tokens, mode=self.prompt_mode)
    return WindowPrompt(text, qid=self.query.qid, start=start, end=end, docids=[c.docid for c in docs])

  def answer(self, prompt: WindowPrompt, out: str | Completion) -> None:
    out = _completion(out)
    perm, source = parse_permutation_with_source(out.text, prompt.end - prompt.start)
    self.state = apply_permutation(self.state, prompt.start, prompt.end, perm)
    self.logs.append(WindowLog(prompt.start, prompt.end, out.prompt_tokens, out.generated_tokens, out.finish_reason,
                               source))

  def ranked(self) -> Ranked:
    return Ranked(self.query.qid, tuple(self.state), tuple(self.logs))


def rerank_listwise_async(queries: Sequence[Query], completer: Completer, tokenizer, *, window: int = 20,
                          stride: int = 10, top_k: int = 100, max_passage_tokens: int | None = 512,
                          prompt_mode: str = "reasoning", full_list: bool = False,
                          progress: Callable[[int], None] | None = None) -> list[Ranked]:
  """The windows of rerank_listwise, each query advancing on its own (see the module docstring): a query's
  next window is queued the moment its previous one is answered, before queries not started yet, most
  windows left first. `progress(1)` is called per answered window."""
  if top_k <= 0:
    raise ValueError(f"top_k must be positive, got {top_k}")
  states = [QueryWindows(q, tokenizer, window=window, stride=stride, top_k=top_k,
                         max_passage_tokens=max_passage_tokens, prompt_mode=prompt_mode, full_list=full_list)
            for q in queries]
  owner: dict[int, int] = {}  # id(prompt) -> query index

  def submit(i: int) -> None:
    prompt = states[i].prompt()
    owner[id(prompt)] = i
    completer.submit(prompt, (0 if states[i].logs else 1, -states[i].left, i))  # continuing first, most left

  for i, state in enumerate(states):
    if not state.done:
      submit(i)
  while owner:
    answered = completer.poll()
    if not answered:
      raise ValueError(f"the completer returned nothing with {len(owner)} prompts pending")
    for prompt, out in answered:
      i = owner.pop(id(prompt))
      states[i].answer(prompt, out)
      if not states[i].done:
        submit(i)
      if progress is not None:
        progress(1)
  return [s.ranked() for s in states]


def count_windows(num_candidates: Sequence[int], *, window: int = 20, stride: int = 10, top_k: int = 100,
                  full_list: bool = False) -> int:
  """How many windows rerank_listwise will rank (for a progress bar's total)."""
  sizes = [min(n, top_k) for n in num_candidates]
  if full_list:
    return sum(1 for n in sizes if n > 0)
  return sum(len(sliding_windows(n, window, stride)) for n in sizes)


# ---------------------------------------------------------------- Rank1 pointwise


def rerank_pointwise(queries: Sequence[Query], score: Callable[[list[str]], Sequence[PointwiseScore]], tokenizer,
                     *, top_k: int = 100, max_passage_tokens: int | None = 512, chunk_size: int | None = None,
                     progress: Callable[[int], None] | None = None) -> list[Ranked]:
  """Rank1: score every (query, passage) of the top-k on its own, sort by score (first-stage order breaks
  ties); the slots keep their first-stage scores, as in listwise mode. `score` sees `chunk_size` prompts
  at a time (all at once by default)."""
  if top_k <= 0:
    raise ValueError(f"top_k must be positive, got {top_k}")
  pairs = [(qi, c) for qi, q in enumerate(queries) for c in q.candidates[:top_k]]
  prompts = [rank1_prompt(queries[qi].text, rank1_passage(c.doc, tokenizer, max_passage_tokens))
             for qi, c in pairs]
  chunk = chunk_size or max(len(prompts), 1)
  scores: list[PointwiseScore] = []
  for at in range(0, len(prompts), chunk):
    part = list(score(prompts[at:at + chunk]))
    if len(part) != len(prompts[at:at + chunk]):
      raise ValueError(f"score() returned {len(part)} scores for {len(prompts[at:at + chunk])} prompts")
    scores.extend(part)
    if progress is not None:
      progress(len(part))
  by_query: list[dict[str, PointwiseScore]] = [{} for _ in queries]
  for (qi, c), s in zip(pairs, scores):
    by_query[qi][c.docid] = s
  out = []
  for q, found in zip(queries, by_query):
    cands = list(q.candidates[:top_k])
    perm = sorted(range(len(cands)), key=lambda j: (-found[cands[j].docid].score, j))
    out.append(Ranked(q.qid, tuple(apply_permutation(cands, 0, len(cands), perm)), (), found))
  return out


def to_run(ranked: Sequence[Ranked]) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}} in reranked order (the slot scores are non-increasing down the list)."""
  return {r.qid: {c.docid: float(c.score) for c in r.candidates} for r in ranked}
