"""Writers for upstream's released formats, each readable by rrjax's own readers.

A labelled set in a directory:
  training_data_all.jsonl   rows {dataset, qid, initial_list, final_list, reasoning, relevant_docids}
  id_query/queries.jsonl    {"qid", "query"} per query         (rrjax.data.sft.read_id_table)
  id_doc/docs.jsonl         {"docid", "text"[, "title"]} per passage
  sft.json                  LLaMA-Factory alpaca list [{system, instruction, output}] (read_sft_json)
  rl.parquet, rl.jsonl      verl RL rows (rrjax.data.rl)

The SFT JSON's system and instruction are the ReasonRank listwise prompt's system and user turns
(build_messages), and output is `<think>{reasoning}</think> <answer>[i] > [j] ...</answer>`
(rrjax.data.sft.training_target), so both SFT readers yield the same (prompt, target) pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from rrjax.data import rl as rl_lib
from rrjax.data.sft import training_target
from rrjax.fileio import atomic_open
from rrjax.ranking.prompt import Passage, build_messages
from rrjax.synth.pipeline import QueryInput, Sample

TRAINING_JSONL = "training_data_all.jsonl"
SFT_JSON = "sft.json"


def write_training_jsonl(path, samples: Sequence[Sample]) -> None:
  with atomic_open(path) as f:
    for s in samples:
      f.write(json.dumps(s.row(), ensure_ascii=False) + "\n")


def write_id_tables(out_dir, samples: Sequence[Sample], queries: Mapping[str, QueryInput]) -> tuple[Path, Path]:
  """id_query/ and id_doc/ holding every query and passage the samples refer to."""
  out_dir = Path(out_dir)
  docs: dict[str, Passage] = {}
  for s in samples:
    q = queries[s.qid]
    by_id = dict(zip(q.docids, q.passages))
    for d in s.initial_list:
      docs.setdefault(d, by_id[d])
  qdir, ddir = out_dir / "id_query", out_dir / "id_doc"
  with atomic_open(qdir / "queries.jsonl") as f:
    for qid in dict.fromkeys(s.qid for s in samples):
      f.write(json.dumps({"qid": qid, "query": queries[qid].query}, ensure_ascii=False) + "\n")
  with atomic_open(ddir / "docs.jsonl") as f:
    for docid, p in docs.items():
      row = {"docid": docid, **({"text": p} if isinstance(p, str) else dict(p))}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return qdir, ddir


def sft_rows(samples: Sequence[Sample], queries: Mapping[str, QueryInput], tokenizer,
             max_passage_tokens: int | None = 512) -> list[dict[str, str]]:
  rows = []
  for s in samples:
    q = queries[s.qid]
    by_id = dict(zip(q.docids, q.passages))
    system, user = build_messages(q.query, [by_id[d] for d in s.initial_list], tokenizer,
                                  max_passage_tokens=max_passage_tokens)
    rows.append({"system": system["content"], "instruction": user["content"],
                 "output": training_target(s.reasoning, s.initial_list, s.final_list)})
  return rows


def write_sft_json(path, rows: Sequence[Mapping[str, str]]) -> None:
  with atomic_open(path) as f:
    json.dump(list(rows), f, ensure_ascii=False, indent=1)
    f.write("\n")


def write_labelled_set(out_dir, samples: Sequence[Sample], queries: Sequence[QueryInput], tokenizer, *,
                       max_passage_tokens: int | None = 512, split: str = "train") -> dict[str, str]:
  """Every released format for `samples`; returns {format: path}. RL rows are made from the written
  training_data_all.jsonl (so they pass its reader's checks)."""
  out_dir = Path(out_dir)
  by_qid = {q.qid: q for q in queries}
  training = out_dir / TRAINING_JSONL
  write_training_jsonl(training, samples)
  qdir, ddir = write_id_tables(out_dir, samples, by_qid)
  write_sft_json(out_dir / SFT_JSON, sft_rows(samples, by_qid, tokenizer, max_passage_tokens))
  paths = {"training_jsonl": str(training), "id_query": str(qdir), "id_doc": str(ddir),
           "sft_json": str(out_dir / SFT_JSON)}
  rows = rl_lib.rl_rows_from_training_jsonl(training, qdir, ddir, tokenizer=tokenizer,
                                            max_passage_tokens=max_passage_tokens, split=split) if samples else []
  for ext in ("parquet", "jsonl"):
    paths[f"rl_{ext}"] = str(out_dir / f"rl.{ext}")
    rl_lib.write_rl(out_dir / f"rl.{ext}", rows)
  return paths
