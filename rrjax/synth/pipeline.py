"""ReasonRank's data synthesis, stages 1-3 (paper Sec. 3; design.md "Data synthesis").

1. The teacher judges every passage of a query's window on its own: the judged-relevant ones are the
   query's positives (`relevant_docids`).
2. The teacher ranks the window (at most 20 passages, first-stage order) and writes its reasoning:
   `final_list` and `reasoning`.
3. Self-consistency filter: keep the sample only if NDCG@10 of final_list, scored against its own
   positives with binary gains, is >= alpha (0.4 in the paper). A query with no positives scores 0.

A query whose judgements or ranking come back malformed is skipped (and counted), never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from rrjax.ranking.prompt import Passage
from rrjax.synth.teachers import JudgeRequest, RankRequest, Teacher

ALPHA = 0.4
# NDCG is a float; a slack far below any real NDCG gap keeps a boundary value (e.g. alpha itself
# computed another way) from flipping on the last bit.
FILTER_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  alpha: float = ALPHA
  max_window: int = 20
  max_passage_tokens: int | None = 512   # passage cut in the written prompts (SFT JSON, RL rows)

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
    if not 1 <= self.max_window <= 20:
      raise ValueError(f"max_window must be in [1, 20], got {self.max_window}")


@dataclasses.dataclass(frozen=True)
class QueryInput:
  """A query with its candidates in first-stage order (and, optionally, its gold answer)."""

  qid: str
  query: str
  docids: tuple[str, ...]
  passages: tuple[Passage, ...]
  answer: str | None = None
  dataset: str = ""

  def __post_init__(self):
    if len(self.docids) != len(self.passages):
      raise ValueError(f"query {self.qid!r}: {len(self.docids)} docids but {len(self.passages)} passages")
    if len(set(self.docids)) != len(self.docids):
      raise ValueError(f"query {self.qid!r}: duplicate docids")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One labelled window: a training_data_all.jsonl row plus its filter score."""

  dataset: str
  qid: str
  initial_list: tuple[str, ...]
  final_list: tuple[str, ...]
  reasoning: str
  relevant_docids: tuple[str, ...]
  ndcg10: float

  def row(self) -> dict[str, Any]:
    return {"dataset": self.dataset, "qid": self.qid, "initial_list": list(self.initial_list),
            "final_list": list(self.final_list), "reasoning": self.reasoning,
            "relevant_docids": list(self.relevant_docids)}


def ndcg_at_10(ranked: Sequence[str], relevant: Sequence[str] | set[str]) -> float:
  """Binary-gain NDCG@10 in float64 (trec_eval ndcg_cut_10 with every listed docid judged)."""
  relevant = set(relevant)
  if not relevant:
    return 0.0
  dcg = math.fsum(1.0 / math.log2(r + 2) for r, d in enumerate(list(ranked)[:10]) if d in relevant)
  idcg = math.fsum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), 10)))
  return dcg / idcg


def passes_filter(ndcg: float, alpha: float = ALPHA) -> bool:
  """The self-consistency rule: keep iff NDCG@10 >= alpha (alpha itself is kept)."""
  return ndcg >= alpha - FILTER_SLACK


@dataclasses.dataclass
class SynthReport:
  queries: int = 0
  skipped_malformed_judge: int = 0
  skipped_malformed_rank: int = 0
  filtered: int = 0
  kept: int = 0
  ndcg10: list[float] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    scores = d.pop("ndcg10")
    d["mean_ndcg10_all_ranked"] = math.fsum(scores) / len(scores) if scores else 0.0
    return d


def synthesize(queries: Sequence[QueryInput], teacher: Teacher,
               config: SynthConfig = SynthConfig()) -> tuple[list[Sample], SynthReport]:
  """Runs stages 1-3 over `queries`; returns the kept samples (input order) and counts."""
  report = SynthReport(queries=len(queries))
  windows = [(q, q.docids[:config.max_window], q.passages[:config.max_window]) for q in queries]
  # Stage 1: one batch of pointwise judgements over every window.
  judge_requests = [JudgeRequest(q.query, p, q.answer) for q, _, ps in windows for p in ps]
  verdicts = teacher.judge(judge_requests) if judge_requests else []
  positives: list[tuple[str, ...] | None] = []
  at = 0
  for q, docids, _ in windows:
    vs = verdicts[at:at + len(docids)]
    at += len(docids)
    if any(v is None for v in vs):
      report.skipped_malformed_judge += 1
      positives.append(None)
    else:
      positives.append(tuple(d for d, v in zip(docids, vs) if v))
  # Stage 2: listwise ranking with reasoning, only for fully judged queries.
  todo = [i for i, p in enumerate(positives) if p is not None]
  ranked = teacher.rank([RankRequest(windows[i][0].query, tuple(windows[i][2]), windows[i][0].answer) for i in todo]) \
      if todo else []
  samples = []
  for i, result in zip(todo, ranked):
    q, docids, _ = windows[i]
    if result is None or sorted(result.permutation) != list(range(len(docids))):
      report.skipped_malformed_rank += 1
      continue
    final = tuple(docids[j] for j in result.permutation)
    # Stage 3: self-consistency filter.
    score = ndcg_at_10(final, positives[i])
    report.ndcg10.append(score)
    if not passes_filter(score, config.alpha):
      report.filtered += 1
      continue
    samples.append(Sample(q.dataset, q.qid, tuple(docids), final, result.reasoning, positives[i], score))
  report.kept = len(samples)
  return samples, report
