"""Reranking across hosts: query i goes to process i % count, rankings meet on process 0, one run file.

Each process reranks its share with its own model replica on its local devices (build the model on
`rrjax.sharding.make_mesh(config, devices=jax.local_devices())`, not on the global mesh: processes run
different prompts, so a computation spanning hosts would deadlock). The rankings travel as JSON bytes
through a collective (`rrjax.distributed.allgather_bytes`), so no shared filesystem is needed; process 0
writes the merged run atomically, in the input query order, and every process gets the merged rankings.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax

from rrjax import distributed
from rrjax.data import trec

Q = TypeVar("Q")
Ranking = Sequence[tuple[str, float]] | Mapping[str, float]
RerankFn = Callable[[Sequence[Q]], Mapping[str, Ranking]]


def _qid(query: Any) -> str:
  if isinstance(query, str):
    return query
  if isinstance(query, Mapping):
    return str(query["qid"])
  if hasattr(query, "qid"):
    return str(query.qid)
  return str(query[0])


def shard(queries: Sequence[Q], process_index: int | None = None, process_count: int | None = None) -> list[Q]:
  """This process's queries: every `process_count`-th, starting at `process_index`."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return list(queries[index::count])


def _encode(rankings: Mapping[str, Ranking]) -> bytes:
  out = {}
  for qid, docs in rankings.items():
    items = docs.items() if isinstance(docs, Mapping) else docs
    out[str(qid)] = [[str(d), float(s)] for d, s in items]
  return json.dumps(out).encode()  # float repr round-trips exactly


def rerank_across_processes(queries: Sequence[Q], rerank_queries: RerankFn, *,
                            qid: Callable[[Q], str] = _qid) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}} of every query, in input order and each in its reranked order, on every
  process. `rerank_queries(share)` returns {qid: [(docid, score), ...] or {docid: score}} for its share;
  it may be called with an empty share (more processes than queries)."""
  order = [qid(q) for q in queries]
  if len(set(order)) != len(order):
    dup = next(q for q in order if order.count(q) > 1)
    raise ValueError(f"query {dup!r} appears more than once")
  mine = shard(queries)
  local = dict(rerank_queries(mine)) if mine else {}
  expected = {qid(q) for q in mine}
  if set(local) != expected:
    missing, extra = sorted(expected - set(local)), sorted(set(local) - expected)
    raise ValueError(f"rerank_queries returned the wrong queries (missing {missing[:5]}, unexpected {extra[:5]})")
  merged: dict[str, list] = {}
  for blob in distributed.allgather_bytes(_encode(local)):
    merged.update(json.loads(blob))
  if set(merged) != set(order):  # a process that lost queries would otherwise shorten the run silently
    raise ValueError(f"merged rankings cover {len(merged)} of {len(order)} queries")
  return {q: {d: s for d, s in merged[q]} for q in order}


def rerank_to_run_file(queries: Sequence[Q], rerank_queries: RerankFn, out: str | os.PathLike, *,
                       tag: str = "rrjax", qid: Callable[[Q], str] = _qid, sort: bool = True
                       ) -> dict[str, dict[str, float]]:
  """`rerank_across_processes`, then process 0 writes `out` (atomically, once) and everyone waits for it."""
  run = rerank_across_processes(queries, rerank_queries, qid=qid)
  try:
    if distributed.is_primary():
      trec.write_run(out, run, tag=tag, sort=sort)
  finally:
    distributed.barrier("rrjax_rerank_run_written")
  return run
