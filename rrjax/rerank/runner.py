"""`rerank(queries, model, tokenizer, settings)`: the settings' mode over the model-free loops of
rrjax.ranking, with the model behind rrjax.rerank.backend."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

from rrjax.ranking import rerank_loop as loop
from rrjax.rerank.backend import ModelBackend
from rrjax.rerank.settings import RerankSettings


@dataclasses.dataclass(frozen=True)
class RerankOutput:
  ranked: list[loop.Ranked]
  wall_seconds: float
  generate_seconds: float
  engine: dict = dataclasses.field(default_factory=dict)  # ModelBackend.engine: shapes, budget, counters


def rerank(queries: Sequence[loop.Query], model, tokenizer, settings: RerankSettings = RerankSettings(), *,
           mesh=None, progress: bool = False, budget=None) -> RerankOutput:
  """Reranks `queries` with `model` in the settings' mode and schedule; a tqdm bar (stderr) over windows as
  they are answered, when asked. `budget(prompt)` scripts generated lengths (see ModelBackend)."""
  from tqdm import tqdm

  s = settings
  backend = ModelBackend(model, tokenizer, s, mesh=mesh, eager=s.schedule == "async", budget=budget,
                         concurrency=len(queries))
  t0 = time.perf_counter()
  if s.mode == "pointwise":
    total = sum(min(len(q.candidates), s.top_k) for q in queries)
    bar = tqdm(total=total, desc="rank1 passages", unit="passage", file=sys.stderr, disable=not progress)
    chunk = max(s.batch_size or 0, 256)  # the bar moves every chunk; generate splits by batch_size anyway
    with bar:
      ranked = loop.rerank_pointwise(queries, backend.score, tokenizer, top_k=s.top_k,
                                     max_passage_tokens=s.max_passage_tokens, chunk_size=chunk, progress=bar.update)
  else:
    full = s.mode == "full"
    total = loop.count_windows([len(q.candidates) for q in queries], window=s.window, stride=s.stride,
                               top_k=s.top_k, full_list=full)
    bar = tqdm(total=total, desc="windows", unit="window", file=sys.stderr, disable=not progress)
    kw = dict(window=s.window, stride=s.stride, top_k=s.top_k, max_passage_tokens=s.max_passage_tokens,
              prompt_mode=s.prompt_mode, full_list=full, progress=bar.update)
    with bar:
      if s.schedule == "async":
        ranked = loop.rerank_listwise_async(queries, backend, tokenizer, **kw)
      else:
        ranked = loop.rerank_listwise(queries, backend.complete, tokenizer, **kw)
  backend.close()
  return RerankOutput(ranked, time.perf_counter() - t0, backend.generate_seconds, dict(backend.engine))

