"""What a rerank reads: a first-stage run, its topics and the passages of its top-k, checked against each other.

The corpus is a jsonl file or a RankGPT json (`[{query, hits}]`, which also carries the run and the topics).
Every query of the run must have its text and every candidate its passage; an error names the run's file and
line, the id and the file it is missing from.
"""

from __future__ import annotations

import dataclasses
import os

from rrjax.data import trec
from rrjax.ranking.rerank_loop import Candidate, Query


@dataclasses.dataclass(frozen=True)
class Inputs:
  queries: list[Query]
  first_stage: dict[str, dict[str, float]]  # the reranked queries' top-k, as read
  sources: dict[str, str]


def is_rankgpt(path: str | os.PathLike) -> bool:
  """A RankGPT json is one JSON list; a jsonl corpus starts with an object."""
  try:
    with trec.open_text(path) as f:
      head = f.read(4096).lstrip()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise trec.TrecFormatError(path, None, f"cannot read: {e}") from None
  return head.startswith("[")


def _line_of(path: str | os.PathLike, qid: str, docid: str | None = None) -> int | None:
  """The first line of a TREC run with this qid (and docid): only looked up to word an error."""
  for n, line in trec.numbered_lines(path):
    fields = line.split()
    if len(fields) >= 3 and fields[0] == qid and (docid is None or fields[2] == docid):
      return n
  return None


def load_inputs(corpus: str | os.PathLike, run: str | os.PathLike | None = None,
                queries: str | os.PathLike | None = None, *, top_k: int = 100,
                max_queries: int | None = None) -> Inputs:
  """Reads and cross-checks the run, topics and corpus. Candidates are in trec_eval order (score desc, docid
  desc); a RankGPT corpus supplies the run and topics that are not given."""
  if is_rankgpt(corpus):
    rg_topics, rg_run, docs = trec.read_rankgpt(corpus)
  else:
    rg_topics = rg_run = None
    docs = trec.read_corpus(corpus)
  if run is None and rg_run is None:
    raise ValueError(f"--run is required: {corpus} is a jsonl corpus, not a RankGPT json with its own run")
  if queries is None and rg_topics is None:
    raise ValueError(f"--queries is required: {corpus} is a jsonl corpus, not a RankGPT json with queries")
  first = trec.read_run(run) if run is not None else rg_run
  topics = trec.read_topics(queries) if queries is not None else rg_topics
  run_name = str(run if run is not None else corpus)
  topics_name = str(queries if queries is not None else corpus)
  if not first:
    raise ValueError(f"{run_name}: the run has no queries")
  qids = list(first)[:max_queries] if max_queries else list(first)

  def where(qid, docid=None):
    line = _line_of(run, qid, docid) if run is not None else None
    return f"{run_name}:{line}" if line else run_name

  out, kept = [], {}
  for qid in qids:
    if qid not in topics:
      raise ValueError(f"{where(qid)}: query id {qid!r} is not in the topics file {topics_name}")
    hits = trec.ranked(first[qid])[:top_k]
    for docid, _ in hits:
      if docid not in docs:
        raise ValueError(f"{where(qid, docid)}: document id {docid!r} (query {qid!r}) is not in the corpus {corpus}")
    out.append(Query(qid, topics[qid], tuple(Candidate(d, s, docs[d]) for d, s in hits)))
    kept[qid] = dict(hits)
  return Inputs(out, kept, {"run": run_name, "queries": topics_name, "corpus": str(corpus)})
