"""Small datasets in their published layouts, written by the tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rrjax.data import benchmarks, trec


def write_parquet(path: Path, rows: Sequence[Mapping], schema: pa.Schema | None = None, row_group_size=None) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), path, row_group_size=row_group_size)
  return path


EXAMPLES_SCHEMA = pa.schema([("query", pa.string()), ("reasoning", pa.string()), ("id", pa.string()),
                             ("excluded_ids", pa.list_(pa.string())), ("gold_ids_long", pa.list_(pa.string())),
                             ("gold_ids", pa.list_(pa.string())), ("gold_answer", pa.string())])


def write_bright(root: Path, task: str, docs: Mapping[str, str], queries: Mapping[str, str],
                 gold: Mapping[str, Sequence[str]], excluded: Mapping[str, Sequence[str]] | None = None,
                 shards: int = 2) -> Path:
  """A snapshot of xlangai/BRIGHT as the hub lays it out: documents/TASK-0000i-of-0000n.parquet (id, content),
  long_documents/, examples/TASK-00000-of-00001.parquet (id, query, reasoning, excluded_ids, gold_ids, ...)."""
  items = list(docs.items())
  for i in range(shards):
    part = [{"id": d, "content": t} for d, t in items[i::shards]]
    write_parquet(root / "documents" / f"{task}-{i:05d}-of-{shards:05d}.parquet", part)
  write_parquet(root / "long_documents" / f"{task}-00000-of-00001.parquet",
                [{"id": f"long/{d}", "content": t} for d, t in items])
  excluded = excluded or {}
  rows = [{"query": q, "reasoning": "r", "id": qid, "excluded_ids": list(excluded.get(qid, ["N/A"])),
           "gold_ids_long": [f"long/{d}" for d in gold.get(qid, [])] or ["N/A"], "gold_ids": list(gold.get(qid, [])),
           "gold_answer": "N/A"} for qid, q in queries.items()]
  write_parquet(root / "examples" / f"{task}-00000-of-00001.parquet", rows, EXAMPLES_SCHEMA)
  return root


def bright_for_bundled_run(root: Path, task: str, num_queries: int, top_k: int,
                           excluded: Mapping[str, Sequence[str]] | None = None) -> Path:
  """A snapshot whose first `num_queries` queries are those of the bundled run, with synthetic documents for
  their top `top_k` (plus one spare each, for a candidate an exclusion removes) and gold_ids from the qrels."""
  run = trec.read_run(benchmarks.bundled_run(task), skip_malformed=True)
  qrels = trec.read_qrels(benchmarks.bundled_qrels(task))
  qids = list(run)[:num_queries]
  docs = {}
  for qid in qids:
    for docid, _ in trec.ranked(run[qid])[:top_k + 1]:
      docs[docid] = f"synthetic passage {len(docs)} for {docid}"
  queries = {q: f"synthetic query {q} of {task}" for q in qids}
  return write_bright(root, task, docs, queries, {q: list(qrels.get(q, {})) for q in qids}, excluded)


def write_jsonl(path: Path, rows: Sequence[Mapping]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return path
