"""What a rerank reads: a first-stage run, its topics and the passages of its top-k, checked against each other.

The corpus is a RankGPT json (`[{query, hits}]`, which also carries the run and the topics), or one or more
document files in any layout rrjax.data.corpus reads (jsonl, MS MARCO tsv, parquet); it is streamed, keeping
only the documents of the run's top-k. Every query of the run must have its text and every candidate its
passage; an error names the run's file and line, the id and the file it is missing from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from rrjax.data import corpus as corpus_lib
from rrjax.data import trec
from rrjax.ranking.rerank_loop import Candidate, Query


@dataclasses.dataclass(frozen=True)
class Inputs:
  queries: list[Query]
  first_stage: dict[str, dict[str, float]]  # the reranked queries' top-k, as read
  sources: dict[str, Any]  # the files read, and counts of what was left out (skipped run lines, excluded docs)


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


def _names(paths: str | os.PathLike | Sequence) -> str:
  return ", ".join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))


def load_inputs(corpus: str | os.PathLike | Sequence[str | os.PathLike], run: str | os.PathLike | None = None,
                queries: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *, top_k: int = 100,
                max_queries: int | None = None, skip_malformed: bool = False,
                exclude: Mapping[str, Sequence[str]] | None = None, dataset: str | None = None) -> Inputs:
  """Reads and cross-checks the run, topics and corpus. Candidates are in trec_eval order (score desc, docid
  desc), `exclude`'s documents (per query) left out before the top-k cut; a RankGPT corpus supplies the run
  and topics that are not given. `skip_malformed` skips run lines that are not 6 fields (counted)."""
  paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
  if len(paths) == 1 and not str(paths[0]).lower().endswith(".parquet") and is_rankgpt(paths[0]):
    rg_topics, rg_run, docs = trec.read_rankgpt(paths[0])
  else:
    rg_topics = rg_run = docs = None
  corpus_name = _names(paths)
  if run is None and rg_run is None:
    raise ValueError(f"--run is required: {corpus_name} is a corpus, not a RankGPT json with its own run")
  if queries is None and rg_topics is None:
    raise ValueError(f"--queries is required: {corpus_name} is a corpus, not a RankGPT json with queries")
  first = trec.read_run(run, skip_malformed=skip_malformed) if run is not None else rg_run
  topics = corpus_lib.read_queries(queries) if queries is not None else rg_topics
  run_name = str(run if run is not None else corpus_name)
  topics_name = _names(queries) if queries is not None else corpus_name
  if not first:
    raise ValueError(f"{run_name}: the run has no queries")
  qids = list(first)[:max_queries] if max_queries else list(first)

  def where(qid, docid=None):
    line = _line_of(run, qid, docid) if run is not None else None
    return f"{run_name}:{line}" if line else run_name

  excluded = 0
  tops = {}
  for qid in qids:
    if qid not in topics:
      raise ValueError(f"{where(qid)}: query id {qid!r} is not in the topics file {topics_name}")
    hits = trec.ranked(first[qid])
    if exclude and exclude.get(qid):
      drop = set(exclude[qid])
      kept_hits = [h for h in hits if h[0] not in drop]
      excluded += len(hits) - len(kept_hits)
      hits = kept_hits
    tops[qid] = hits[:top_k]
  if docs is None:
    docs = corpus_lib.read_documents(paths, wanted={d for hits in tops.values() for d, _ in hits})
  out, kept = [], {}
  for qid, hits in tops.items():
    for docid, _ in hits:
      if docid not in docs:
        raise ValueError(f"{where(qid, docid)}: document id {docid!r} (query {qid!r}) is not in the corpus "
                         f"{corpus_name}")
    out.append(Query(qid, topics[qid], tuple(Candidate(d, s, docs[d]) for d, s in hits)))
    kept[qid] = dict(hits)
  sources: dict[str, Any] = {"run": run_name, "queries": topics_name, "corpus": corpus_name}
  if dataset:
    sources["dataset"] = dataset
  if getattr(first, "skipped", 0):
    sources["run_lines_skipped"] = first.skipped
  if exclude is not None:
    sources["excluded_candidates"] = excluded
  return Inputs(out, kept, sources)
