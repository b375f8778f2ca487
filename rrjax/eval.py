"""trec_eval-exact evaluation: `python -m rrjax.eval --qrels Q --run R [--metrics ...]`.

Semantics are trec_eval's (checked against pytrec_eval to 1e-6 in tests/test_eval.py):
- the rank column is ignored; documents are sorted by score descending, ties by docid descending;
- the mean is over queries present in both the run and the qrels (a query whose judgments are all
  0 counts, and scores 0);
- `relevance_level` sets which grades count as relevant for the binary measures (recall, mrr,
  map, P); ndcg always uses the graded gains, with the ideal over every judged document.

Metric names: `ndcg@k`, `recall@k`, `mrr@k`, `map@k` (trec_eval map_cut_k), `p@k`; without `@k`
the whole ranking counts (`mrr` is trec_eval's recip_rank, `map` its map). trec_eval spellings
(`ndcg_cut_10`, `recall_100`, `recip_rank`, `map_cut_100`, `P_10`) are accepted too.
The numbers come from the jnp functions in rrjax.ranking.metrics, run in float64.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrjax.data import trec
from rrjax.ranking import metrics as M

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")
_KINDS = ("ndcg", "recall", "mrr", "map", "p")
_TREC_NAMES = (
  (re.compile(r"^ndcg_cut[_.](\d+)$"), "ndcg"),
  (re.compile(r"^recall[_.](\d+)$"), "recall"),
  (re.compile(r"^map_cut[_.](\d+)$"), "map"),
  (re.compile(r"^p[_.](\d+)$"), "p"),
)


def parse_metric(name: str) -> tuple[str, int | None]:
  """'ndcg@10' -> ('ndcg', 10); 'mrr' -> ('mrr', None); trec_eval names map to the same."""
  low = name.strip().lower()
  if low == "recip_rank":
    return "mrr", None
  for pattern, kind in _TREC_NAMES:
    if m := pattern.match(low):
      return kind, int(m.group(1))
  kind, at, k = low.partition("@")
  if kind not in _KINDS or (at and not k.isdigit()) or (at and int(k) < 1):
    raise ValueError(f"unknown metric {name!r}; use one of {', '.join(k + '@k' for k in _KINDS)}"
                     " or a trec_eval name like ndcg_cut_10")
  return kind, int(k) if at else None


def _bucket(n: int, floor: int = 8) -> int:
  """Round up to a power of two so jit compiles once per size class."""
  return max(floor, 1 << max(0, n - 1).bit_length())


def _compute(specs: tuple[tuple[str, int | None], ...], rel_level: int, gains_BxL, judged_BxR):
  out = []
  for kind, k in specs:
    if kind == "ndcg":
      out.append(M.ndcg_at_k(gains_BxL, judged_BxR, k))
    elif kind == "recall":
      out.append(M.recall_at_k(gains_BxL, judged_BxR, k, rel_level))
    elif kind == "mrr":
      out.append(M.mrr_at_k(gains_BxL, k, rel_level))
    elif kind == "map":
      out.append(M.map_at_k(gains_BxL, judged_BxR, k, rel_level))
    else:
      out.append(M.precision_at_k(gains_BxL, k, rel_level))
  return jnp.stack(out, axis=0)


_compute_jit = jax.jit(_compute, static_argnums=(0, 1))


def evaluate(qrels: Mapping[str, Mapping[str, int]] | str | os.PathLike,
             run: Mapping[str, Mapping[str, float]] | str | os.PathLike,
             metrics: Sequence[str] | str = DEFAULT_METRICS,
             relevance_level: int = 1) -> dict[str, Any]:
  """Score a run against qrels with trec_eval semantics.

  qrels/run are `{qid: {docid: rel}}` / `{qid: {docid: score}}` or paths to TREC files.
  Returns {"mean": {metric: float}, "per_query": {qid: {metric: float}}}, keyed by the names given.
  """
  if isinstance(qrels, (str, os.PathLike)):
    qrels = trec.read_qrels(qrels)
  if isinstance(run, (str, os.PathLike)):
    run = trec.read_run(run)
  names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
  names = [m for m in names if m]
  if not names:
    raise ValueError("no metrics given")
  specs = tuple(parse_metric(m) for m in names)
  if int(relevance_level) < 1:
    # Unjudged and padded ranks carry grade 0, so level <= 0 cannot tell them apart.
    raise ValueError(f"relevance_level must be >= 1 (got {relevance_level})")
  qids = [q for q in run if q in qrels]
  if not qids:
    return {"mean": {m: 0.0 for m in names}, "per_query": {}}

  lists = [[qrels[q].get(d, 0) for d, _ in trec.ranked(run[q])] for q in qids]
  judged = [list(qrels[q].values()) for q in qids]
  B = _bucket(len(qids))
  L = _bucket(max(len(x) for x in lists))
  R = _bucket(max(len(x) for x in judged))
  gains_BxL = np.zeros((B, L), np.float64)
  judged_BxR = np.zeros((B, R), np.float64)
  for i, (g, j) in enumerate(zip(lists, judged)):
    gains_BxL[i, :len(g)] = g
    judged_BxR[i, :len(j)] = j
  with jax.enable_x64(True):
    values_MxB = np.asarray(_compute_jit(specs, int(relevance_level),
                                         jnp.asarray(gains_BxL), jnp.asarray(judged_BxR)))
  values_MxQ = values_MxB[:, :len(qids)]
  per_query = {q: {m: float(values_MxQ[i, b]) for i, m in enumerate(names)} for b, q in enumerate(qids)}
  # trec_eval sums in query order; math.fsum keeps the mean exact to the last bit anyway.
  mean = {m: math.fsum(values_MxQ[i].tolist()) / len(qids) for i, m in enumerate(names)}
  return {"mean": mean, "per_query": per_query}


def format_table(result: Mapping[str, Any], per_query: bool = False) -> str:
  """trec_eval-style lines: `metric  qid|all  value`."""
  names = list(result["mean"])
  width = max(len(n) for n in names + ["num_q"]) + 2
  lines = []
  if per_query:
    for qid, vals in result["per_query"].items():
      lines += [f"{n:<{width}}{qid:<10}{vals[n]:.4f}" for n in names]
  lines.append(f"{'num_q':<{width}}{'all':<10}{len(result['per_query'])}")
  lines += [f"{n:<{width}}{'all':<10}{result['mean'][n]:.4f}" for n in names]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.eval", description=__doc__.split("\n")[0])
  ap.add_argument("--qrels", required=True, help="TREC qrels: qid iter docid rel")
  ap.add_argument("--run", required=True, help="TREC run: qid Q0 docid rank score tag")
  ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                  help="comma-separated, e.g. ndcg@10,recall@100,mrr@10,map@100")
  ap.add_argument("--relevance-level", type=int, default=1, help="min grade counted relevant (binary measures)")
  ap.add_argument("--per-query", action="store_true", help="also print each query's values")
  ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
  ap.add_argument("--skip-malformed", action="store_true",
                  help="skip run lines that are not 6 fields (ReasonRank's BRIGHT handling)")
  args = ap.parse_args(argv)
  qrels = trec.read_qrels(args.qrels)
  run = trec.read_run(args.run, skip_malformed=args.skip_malformed)
  if not any(q in qrels for q in run):
    raise ValueError(f"{args.run}: no query is in both the run and {args.qrels}")
  result = evaluate(qrels, run, args.metrics, args.relevance_level)
  if run.skipped:
    print(f"rrjax.eval: skipped {run.skipped} malformed run lines", file=sys.stderr)
  if args.json:
    out = dict(result, num_queries=len(result["per_query"]), relevance_level=args.relevance_level)
    if not args.per_query:
      out.pop("per_query")
    print(json.dumps(out, indent=1))
  else:
    print(format_table(result, args.per_query))
  return 0


def console() -> None:
  """The `rrjax-eval` console script (errors are prefixed with the script's name)."""
  from rrjax import cli
  cli.run(main)


if __name__ == "__main__":
  from rrjax import cli
  cli.run(main, prog="rrjax.eval")
