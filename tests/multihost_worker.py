"""One process of a multi-host test (tests/test_multihost.py starts one per simulated host).

  python tests/multihost_worker.py train SPEC.json    SFT through rrjax.train (gin files and params)
  python tests/multihost_worker.py rerank SPEC.json   scripted listwise reranking into one run file

The parent sets RRJAX_COORDINATOR_ADDRESS / RRJAX_NUM_PROCESSES / RRJAX_PROCESS_ID for multi-process runs
and XLA_FLAGS for the device count; without them this is the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rrjax import distributed  # noqa: E402


def _train(spec: dict) -> None:
  from rrjax.train import __main__ as entry
  entry.run(spec["gin_files"], spec["gin_params"])


def _queries(n: int, depth: int):
  # Distinct scores per slot so the run file's order is the reranked order.
  return [{"qid": f"q{i}", "docs": [(f"d{i}_{j}", float(depth - j) + 0.5 * i) for j in range(depth)]}
          for i in range(n)]


def _scripted(prompt_docids: list[str], qid: str) -> str:
  """The identity order, reversed for every third query so the merge is not trivially the input."""
  n = len(prompt_docids)
  order = list(range(1, n + 1))
  if int(qid[1:]) % 3 == 2:
    order.reverse()
  return f"<think>scripted</think> <answer>{' > '.join(f'[{i}]' for i in order)}</answer>"


def rerank_queries(queries):
  """A completion-based sliding-window rerank (window 4, stride 2) with a scripted model."""
  from rrjax.ranking.parse import parse_permutation
  from rrjax.ranking.window import apply_permutation, sliding_windows
  out = {}
  for q in queries:
    cands = [{"docid": d, "score": s} for d, s in q["docs"]]
    for start, end in sliding_windows(len(cands), 4, 2):
      text = _scripted([c["docid"] for c in cands[start:end]], q["qid"])
      cands = apply_permutation(cands, start, end, parse_permutation(text, end - start))
    out[q["qid"]] = [(c["docid"], c["score"]) for c in cands]
  return out


def _rerank(spec: dict) -> None:
  import jax

  from rrjax import rerank
  from rrjax.data import trec
  queries = _queries(spec["num_queries"], spec["depth"])
  seen = []

  def counted(share):
    seen.extend(q["qid"] for q in share)
    return rerank_queries(share)

  run = rerank.rerank_across_processes(queries, counted)
  if distributed.is_primary():
    trec.write_run(spec["out"], run)
  distributed.barrier("rerank_written")
  counts = distributed.allgather_json({"queries": len(seen)})  # e.g. report totals across processes
  Path(spec["out"] + f".share{jax.process_index()}").write_text(json.dumps({"seen": seen, "counts": counts}))


def main(argv) -> int:
  mode, spec_path = argv
  spec = json.loads(Path(spec_path).read_text())
  distributed.initialize(timeout_s=60)
  try:
    {"train": _train, "rerank": _rerank}[mode](spec)
  finally:
    distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
