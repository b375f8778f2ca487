"""`rrjax.Reranker`: ReasonRank from Python, one engine shared by every caller.

    reranker = rrjax.Reranker.load("path/to/hf-or-run", max_new_tokens=256)
    results = reranker.rerank("how long can a flea live", ["Cats groom.", {"title": "Fleas", "text": "..."}])

One worker thread owns the model backend (rrjax.rerank.backend.ModelBackend: one engine kept across calls).
Each request is a query whose windows (rrjax.ranking.rerank_loop.QueryWindows) go into that backend as the
async schedule does: a window is queued as soon as its query's previous window is answered, so the windows
of concurrent requests share the decode slots. A window depends only on its own query's previous window,
so a request's ranking does not depend on the other traffic: under greedy decoding it equals
`python -m rrjax.rerank` on the same query and documents.

relevance_score = 1 - rank / n, with rank the 0-based final position and n the number of documents: 1.0 for
the best, 1/n for the last, strictly decreasing with the rank. It orders; it is not a probability.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Any, Mapping, Sequence

from rrjax.ranking import rerank_loop as loop
from rrjax.rerank.backend import ModelBackend
from rrjax.rerank.settings import FIELDS, RerankSettings

OVERRIDES = ("window", "stride", "max_new_tokens")  # per-request settings (the server calls window `window_size`)
DEFAULT_SLOTS = 16  # decode slots when RerankSettings.batch_size is unset: the windows of 16 concurrent requests


class QueueFull(Exception):
  """More windows than the reranker queues; `retry_after_s` estimates when there will be room."""

  def __init__(self, message: str, retry_after_s: float):
    super().__init__(message)
    self.retry_after_s = retry_after_s


class Cancelled(Exception):
  """The request was cancelled (its caller left, or its deadline passed) before it finished."""


@dataclasses.dataclass(frozen=True)
class RankedDocument:
  index: int  # position in the request's documents
  relevance_score: float  # 1 - rank / n (see the module docstring)
  document: Mapping[str, str]  # {"text": ...} and "title" when given


@dataclasses.dataclass(frozen=True)
class Window:
  """One answered window: its span in the order it saw, tokens, how the answer was read, and its text."""

  start: int
  end: int
  prompt_tokens: int
  completion_tokens: int
  parser: str
  text: str


@dataclasses.dataclass(frozen=True)
class RerankResult:
  results: list[RankedDocument]  # best first, cut to top_n
  windows: list[Window]
  seconds: float

  @property
  def prompt_tokens(self) -> int:
    return sum(w.prompt_tokens for w in self.windows)

  @property
  def completion_tokens(self) -> int:
    return sum(w.completion_tokens for w in self.windows)


def document(doc: Any, where: str) -> dict[str, str]:
  """A document as the prompt reads it: a string, or a mapping with a string `text` (and `title`)."""
  if isinstance(doc, str):
    return {"text": doc}
  if isinstance(doc, Mapping):
    text, title = doc.get("text"), doc.get("title")
    if not isinstance(text, str):
      raise ValueError(f"{where}.text: a string is required, got {type(text).__name__}")
    if title is not None and not isinstance(title, str):
      raise ValueError(f"{where}.title: a string is required, got {type(title).__name__}")
    return {"text": text} if title is None else {"title": title, "text": text}
  raise ValueError(f"{where}: a string or an object with `text` is required, got {type(doc).__name__}")


def _positive(name: str, value: Any) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclasses.dataclass
class _Job:
  windows: loop.QueryWindows
  docs: list[dict[str, str]]
  top_n: int | None
  max_new_tokens: int | None
  seq: int
  future: concurrent.futures.Future
  started: float
  texts: list[str] = dataclasses.field(default_factory=list)
  cancelled: bool = False

  def result(self) -> RerankResult:
    ranked = self.windows.ranked()
    order = [int(c.docid) for c in ranked.candidates]
    seen = set(order)
    order += [i for i in range(len(self.docs)) if i not in seen]  # beyond top_k: input order, after the reranked
    n = len(order)
    results = [RankedDocument(i, 1.0 - rank / n, self.docs[i]) for rank, i in enumerate(order)]
    windows = [Window(w.start, w.end, w.prompt_tokens, w.generated_tokens, w.parser, t)
               for w, t in zip(ranked.windows, self.texts)]
    return RerankResult(results[:self.top_n], windows, time.perf_counter() - self.started)


class Reranker:
  """ReasonRank over one engine (see the module docstring). `settings` is a RerankSettings (listwise or full
  mode); `max_queued_windows` bounds the windows of accepted, unfinished requests (beyond it `submit` raises
  QueueFull). Thread-safe; `close()` finishes the accepted requests and stops the worker."""

  def __init__(self, model, tokenizer, settings: RerankSettings = RerankSettings(), *, mesh=None,
               max_queued_windows: int | None = None, name: str = "rrjax"):
    if settings.mode == "pointwise":
      raise ValueError("mode: the Reranker runs listwise or full windows; pointwise (Rank1) is the CLI's")
    self.model, self.tokenizer, self.settings, self.mesh, self.name = model, tokenizer, settings, mesh, name
    self.max_queued_windows = max_queued_windows
    self.backend = ModelBackend(model, tokenizer, settings, mesh=mesh, eager=True,
                                concurrency=settings.batch_size or DEFAULT_SLOTS)
    self._cond = threading.Condition()
    self._inbox: list[_Job] = []
    self._cancels: list[_Job] = []
    self._owner: dict[int, _Job] = {}  # id(window prompt) -> its job, while the window is in the backend
    self._seq = itertools.count()
    self._closing = False
    self.windows_left = 0  # windows of accepted, unfinished requests
    self.counters = {"windows": 0, "completion_tokens": 0, "prompt_tokens": 0, "requests": 0, "cancelled": 0}
    self._window_seconds: list[float] = []  # recent answered-window intervals, for Retry-After
    self._last_answer = time.perf_counter()
    self._thread = threading.Thread(target=self._run, name="rrjax-reranker", daemon=True)
    self._thread.start()

  @classmethod
  def load(cls, path_or_run: str, *, dtype: str | None = None, gin_file: Sequence[str] = (),
           gin_param: Sequence[str] = (), max_queued_windows: int | None = None, **settings) -> Reranker:
    """A Reranker over an HF checkpoint directory, an rrjax run, or a gin file naming one (`Reranker.model =
    'PATH'`, beside its `RerankSettings.*`); `settings` are RerankSettings fields, over the gin's. The model
    sits on this process's devices as the rerank CLI places it (RerankSettings.mesh, else by its size)."""
    from rrjax import tokenizer as tokenizer_lib
    from rrjax.checkpoints import from_pretrained
    from rrjax.rerank import cli as rerank_cli

    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
      raise ValueError(f"unknown RerankSettings field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    path, files = str(path_or_run), list(gin_file)
    if path.endswith(".gin"):
      files.insert(0, path)
      path = _model_in_gin(files, gin_param)
    base = rerank_cli.settings_from_gin(files, gin_param)
    s = dataclasses.replace(base, **settings)
    mesh = rerank_cli.local_mesh(path, s.mesh, dtype)
    model = from_pretrained(path, dtype=dtype, mesh=mesh)
    tok = tokenizer_lib.load(path, model_type=model.config.model_type)
    return cls(model, tok, s, mesh=mesh, max_queued_windows=max_queued_windows, name=path)

  # ---------------------------------------------------------------- requests

  def plan(self, query: str, documents: Sequence[Any], top_n: int | None = None, **overrides) -> _Job:
    """Checks a request (ValueError naming the field) and makes its job, not yet submitted."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
      raise ValueError(f"{unknown[0]}: not a per-request setting (those are {', '.join(OVERRIDES)})")
    if not isinstance(query, str) or not query.strip():
      raise ValueError("query: a non-empty string is required")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence) or not documents:
      raise ValueError("documents: a non-empty list is required")
    docs = [document(d, f"documents[{i}]") for i, d in enumerate(documents)]
    _positive("top_n", top_n)
    for name, value in overrides.items():
      _positive(name, value)
    s = self.settings
    window = overrides.get("window") or s.window
    stride = overrides.get("stride") or s.stride
    if stride > window:
      raise ValueError(f"stride: {stride} exceeds the window size {window} (passages would be skipped)")
    seq = next(self._seq)
    candidates = tuple(loop.Candidate(str(i), float(len(docs) - i), d) for i, d in enumerate(docs))
    windows = loop.QueryWindows(loop.Query(f"r{seq}", query, candidates), self.tokenizer, window=window,
                                stride=stride, top_k=s.top_k, max_passage_tokens=s.max_passage_tokens,
                                prompt_mode=s.prompt_mode, full_list=s.mode == "full")
    return _Job(windows, docs, top_n, overrides.get("max_new_tokens"), seq, concurrent.futures.Future(),
                time.perf_counter())

  def submit(self, job: _Job) -> concurrent.futures.Future:
    """Queues a planned job; its future gives a RerankResult (or raises Cancelled)."""
    with self._cond:
      if self._closing:
        raise QueueFull("the reranker is shutting down", 1.0)
      left = job.windows.left
      limit = self.max_queued_windows
      if limit is not None and self.windows_left + left > limit:
        if left > limit:
          raise ValueError(f"documents: this request needs {left} windows; at most {limit} are queued at once")
        raise QueueFull(f"{self.windows_left} windows queued (at most {limit})", self._retry_after(left))
      self.windows_left += left
      self.counters["requests"] += 1
      self._inbox.append(job)
      self._cond.notify()
    return job.future

  def cancel(self, job: _Job) -> None:
    """Drops a job's windows (its future raises Cancelled; a no-op once it finished). Its windows stop counting
    at once; the worker removes the queued ones from the engine at its next turn, and ignores the answer of
    one already decoding."""
    with self._cond:
      if job.future.done() or job.cancelled:
        return
      job.cancelled = True
      self.windows_left -= job.windows.left
      self.counters["cancelled"] += 1
      job.future.set_exception(Cancelled("cancelled"))
      self._cancels.append(job)
      self._cond.notify()

  def rerank(self, query: str, documents: Sequence[Any], top_n: int | None = None, **overrides) -> RerankResult:
    """The documents (strings or {"text", "title"}) best first, cut to `top_n`; `overrides`: window, stride,
    max_new_tokens."""
    return self.submit(self.plan(query, documents, top_n, **overrides)).result()

  def rerank_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[RerankResult]:
    """Several requests ({"query", "documents", "top_n", ...}) at once: their windows share the slots."""
    jobs = [self.plan(**dict(r)) for r in requests]
    return [f.result() for f in [self.submit(j) for j in jobs]]

  async def arerank(self, query: str, documents: Sequence[Any], top_n: int | None = None,
                    timeout_s: float | None = None, **overrides) -> RerankResult:
    """`rerank` for asyncio: concurrent callers share the engine. Cancelling the awaiting task, or
    `timeout_s` passing (asyncio.TimeoutError), cancels the request's queued windows."""
    job = self.plan(query, documents, top_n, **overrides)
    future = asyncio.wrap_future(self.submit(job))
    try:
      return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except (asyncio.CancelledError, asyncio.TimeoutError):
      self.cancel(job)
      raise

  def stats(self) -> dict:
    """Counters, the backend engine's shapes and occupancy, the windows queued and in slots."""
    with self._cond:
      for _ in range(10):  # the worker may be adding a key (an engine being replaced) while we copy
        try:
          engine = dict(self.backend.engine)
          break
        except RuntimeError:
          time.sleep(0.001)
      else:
        engine = {}
      live = self.backend.live_engine
      if live is not None:  # the running engine's counters are accounted when it is replaced
        for key, value in live.stats.as_dict().items():
          if key != "occupancy":
            engine[key] = engine.get(key, 0) + value
        engine["occupancy"] = engine["live_slot_steps"] / engine["slot_steps"] if engine.get("slot_steps") else 0.0
        engine["active_slots"] = live.active
      return {**self.counters, "windows_left": self.windows_left, "windows_queued": self.backend.queued,
              "engine": engine}

  def close(self, timeout_s: float | None = None) -> None:
    """Stops intake, finishes the accepted requests, stops the worker."""
    with self._cond:
      self._closing = True
      self._cond.notify()
    self._thread.join(timeout_s)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---------------------------------------------------------------- the worker thread

  def _retry_after(self, windows: int) -> float:
    """Seconds until `windows` more fit: the queue's excess at the recent answering rate."""
    excess = self.windows_left + windows - (self.max_queued_windows or 0)
    per_window = sorted(self._window_seconds)[len(self._window_seconds) // 2] if self._window_seconds else 1.0
    return max(1.0, excess * per_window)

  def _submit_window(self, job: _Job) -> None:
    prompt = job.windows.prompt()
    self._owner[id(prompt)] = job
    # Earlier requests first (FIFO across requests); within one, windows go in order anyway.
    self.backend.submit(prompt, (job.seq, len(job.windows.logs)), max_new_tokens=job.max_new_tokens)

  def _drop(self, job: _Job) -> None:
    self.backend.cancel(lambda p: self._owner.get(id(p)) is job)
    for key in [k for k, j in self._owner.items() if j is job]:
      del self._owner[key]  # an answer from a slot it still holds is ignored (its prompt is unknown)

  def _run(self) -> None:
    while True:
      with self._cond:
        while not (self._inbox or self._cancels or self._owner or self._closing):
          self._cond.wait()
        if self._closing and not (self._inbox or self._owner or self._cancels):
          break
        inbox, self._inbox = self._inbox, []
        cancels, self._cancels = self._cancels, []
        for job in cancels:
          self._drop(job)
        for job in inbox:
          if job.cancelled:
            continue
          if job.windows.done:  # nothing to rank (one document)
            self.windows_left -= job.windows.left
            job.future.set_result(job.result())
          else:
            try:
              self._submit_window(job)
            except Exception as e:  # e.g. a window that does not fit the memory budget
              self.windows_left -= job.windows.left
              job.future.set_exception(e)
      if not self._owner:
        continue
      try:
        answered = self.backend.poll()
      except Exception as e:  # a failing engine fails the requests it held, not the worker
        with self._cond:
          for job in {id(j): j for j in self._owner.values()}.values():
            if not job.cancelled and not job.future.done():
              self.windows_left -= job.windows.left
              job.future.set_exception(e)
          self._owner.clear()
          self.backend = ModelBackend(self.model, self.tokenizer, self.settings, mesh=self.mesh, eager=True,
                                      concurrency=self.settings.batch_size or DEFAULT_SLOTS)
        continue
      with self._cond:
        now = time.perf_counter()
        for prompt, out in answered:
          job = self._owner.pop(id(prompt), None)
          self._window_seconds = (self._window_seconds + [(now - self._last_answer) / max(len(answered), 1)])[-64:]
          self.counters["windows"] += 1
          self.counters["completion_tokens"] += out.generated_tokens
          self.counters["prompt_tokens"] += out.prompt_tokens
          if job is None or job.cancelled:
            continue
          job.windows.answer(prompt, out)
          job.texts.append(out.text)
          self.windows_left -= 1
          if job.windows.done:
            job.future.set_result(job.result())
          else:
            self._submit_window(job)
        self._last_answer = now


_GIN_RERANKER = []  # the `Reranker` gin configurable, registered on first use (gin only where a gin file is read)


def _model_in_gin(files: Sequence[str], params: Sequence[str]) -> str:
  """The `Reranker.model = 'PATH'` binding of gin files that name their model."""
  import gin

  from rrjax import gin_config

  if not _GIN_RERANKER:
    def reranker_fields(model=None):
      return model
    _GIN_RERANKER.append(gin.external_configurable(reranker_fields, name="Reranker"))
  model = gin_config.parse(files, params, _GIN_RERANKER[0], subdir="rerank")
  if not isinstance(model, str) or not model:
    raise ValueError(f"gin ({', '.join(map(str, files))}): no `Reranker.model = 'PATH'` binding names the model")
  return model
