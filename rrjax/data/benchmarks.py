"""Benchmarks by name: what `--dataset bright:TASK|beir|msmarco --data_dir D` means for a rerank.

- `bright:TASK` (and `bright-long:TASK`): D is a local snapshot of the `xlangai/BRIGHT` dataset (what
  `huggingface-cli download xlangai/BRIGHT --repo-type dataset --local-dir D` writes, or the hub cache's
  `datasets--xlangai--BRIGHT` folder, or the cache root above it): documents from `documents/TASK-*.parquet`
  (`long_documents/` for bright-long), the original queries and `gold_ids` (`gold_ids_long`) qrels from
  `examples/TASK-*.parquet`, `excluded_ids` left out of the candidates, and ReasonRank's bundled first-stage
  run (ReasonIR-8B on GPT-4 reasoning queries, top-100; bright only). Run lines that are not 6 fields are
  skipped, as upstream's reader does (12 stackoverflow lines whose docids contain spaces).
- `beir`: D holds BEIR's corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv; the run is given with --run
  (`python -m rrjax.retrieve` makes a BM25 one).
- `msmarco`: D holds the passage collection.tsv; queries, qrels and run are given with flags.
Explicit `--corpus/--queries/--qrels/--run` override what the layout holds. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from rrjax.data import corpus as corpus_lib

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "bright"
# BRIGHT's tasks in the order of its tables (and ReasonRank's Table 1), with the papers' column names.
BRIGHT_TASKS = {"biology": "Bio.", "earth_science": "Earth.", "economics": "Econ.", "psychology": "Psy.",
                "robotics": "Rob.", "stackoverflow": "Stack.", "sustainable_living": "Sus.", "leetcode": "Leet.",
                "pony": "Pony", "aops": "AoPS", "theoremqa_questions": "TheoQ.", "theoremqa_theorems": "TheoT."}
HUB_REPO = "xlangai/BRIGHT"
DATASETS = ("bright:TASK", "bright-long:TASK", "beir", "msmarco")


def bright_task(name: str) -> str:
  """A BRIGHT task name as the hub spells it (`earth-science` -> `earth_science`), or a ValueError."""
  task = name.strip().lower().replace("-", "_")
  if task not in BRIGHT_TASKS:
    raise ValueError(f"unknown BRIGHT task {name!r}; tasks: {', '.join(BRIGHT_TASKS)}")
  return task


def bundled_run(task: str) -> Path:
  """ReasonRank's first-stage run for a BRIGHT task, bundled with rrjax (rrjax/assets/bright)."""
  return ASSETS / "runs" / f"{bright_task(task)}.reasonir_gpt4cot_top100.txt.gz"


def bundled_qrels(task: str) -> Path:
  """BRIGHT's gold_ids qrels for a task, bundled with rrjax (Anserini's file names use hyphens)."""
  return ASSETS / "qrels" / f"qrels.bright-{bright_task(task).replace('_', '-')}.txt.gz"


def bright_snapshot(data_dir: str | os.PathLike) -> Path:
  """The folder holding examples/ and documents/: D itself, or the hub cache's snapshot of xlangai/BRIGHT."""
  root = Path(data_dir)
  if not root.is_dir():
    raise ValueError(f"{root}: --data_dir is not a directory")
  cache = root / f"datasets--{HUB_REPO.replace('/', '--')}"
  for repo in (root, cache):
    if (repo / "examples").is_dir():
      return repo
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
      ref = repo / "refs" / "main"
      if ref.is_file() and (snapshots / ref.read_text().strip() / "examples").is_dir():
        return snapshots / ref.read_text().strip()
      found = sorted((p for p in snapshots.iterdir() if (p / "examples").is_dir()), key=lambda p: p.stat().st_mtime)
      if found:
        return found[-1]
  raise ValueError(f"{root}: no BRIGHT snapshot (examples/ and documents/) here; download it with "
                   f"`huggingface-cli download {HUB_REPO} --repo-type dataset --local-dir {root}`")


def _shards(folder: Path, task: str) -> tuple[str, ...]:
  files = sorted(str(p) for pattern in (f"{task}-*.parquet", f"{task}.parquet") for p in folder.glob(pattern))
  if not files:
    raise ValueError(f"{folder}: no {task}-*.parquet (is this a snapshot of {HUB_REPO}?)")
  return tuple(files)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Where a rerank's inputs come from, and how to read them (rrjax.data.inputs.load_inputs)."""

  name: str
  corpus: tuple[str, ...]
  queries: tuple[str, ...] | None = None
  run: str | None = None
  qrels: tuple[str, ...] | None = None
  qrels_field: str = "gold_ids"          # for qrels read from parquet examples
  exclude: tuple[str, ...] | None = None  # parquet examples whose `excluded_ids` are not candidates
  skip_malformed_run: bool = False

  def load(self, *, top_k: int = 100, max_queries: int | None = None):
    from rrjax.data.inputs import load_inputs
    exclude = corpus_lib.read_id_lists(self.exclude, "excluded_ids") if self.exclude else None
    return load_inputs(self.corpus, self.run, self.queries, top_k=top_k, max_queries=max_queries,
                       skip_malformed=self.skip_malformed_run, exclude=exclude,
                       dataset=None if self.name == "files" else self.name)

  def read_qrels(self) -> dict[str, dict[str, int]] | None:
    return corpus_lib.read_qrels(self.qrels, field=self.qrels_field) if self.qrels else None


def _one(path: str | None) -> tuple[str, ...] | None:
  return (str(path),) if path else None


def resolve(dataset: str | None, data_dir: str | os.PathLike | None = None, *, split: str = "test",
            corpus: str | None = None, queries: str | None = None, qrels: str | None = None,
            run: str | None = None) -> Dataset:
  """The Dataset a rerank reads: the named layout in `data_dir`, with explicit paths taking precedence."""
  if not dataset:
    if not corpus:
      raise ValueError("give --corpus (a jsonl, tsv or parquet corpus, or a RankGPT json), or --dataset "
                       f"({' | '.join(DATASETS)}) with --data_dir")
    return Dataset("files", (str(corpus),), _one(queries), run, _one(qrels))
  if not data_dir:
    raise ValueError(f"--dataset {dataset} needs --data_dir")
  kind, _, task = dataset.partition(":")
  root = Path(data_dir)
  if kind in ("bright", "bright-long"):
    task = bright_task(task)
    snapshot = bright_snapshot(root)
    examples = _shards(snapshot / "examples", task)
    long = kind == "bright-long"
    if long and not run:
      raise ValueError(f"--dataset {dataset}: give --run (the bundled first-stage runs are over BRIGHT's "
                       "short documents)")
    docs = (str(corpus),) if corpus else _shards(snapshot / ("long_documents" if long else "documents"), task)
    return Dataset(f"{kind}:{task}", docs, _one(queries) or examples, str(run or bundled_run(task)),
                   _one(qrels) or examples, "gold_ids_long" if long else "gold_ids", examples,
                   skip_malformed_run=True)
  if task:
    raise ValueError(f"--dataset {dataset}: only bright takes a task (bright:TASK)")
  if kind == "beir":
    docs = corpus or root / "corpus.jsonl"
    split_qrels = root / "qrels" / f"{split}.tsv"
    if not qrels and not split_qrels.exists():
      raise ValueError(f"{split_qrels}: no qrels for --split {split} in this BEIR folder")
    if not run:
      raise ValueError("--dataset beir: give --run (BEIR has no first-stage run; `python -m rrjax.retrieve` "
                       "makes a BM25 one)")
    return Dataset("beir", (str(docs),), _one(queries or root / "queries.jsonl"), run, _one(qrels or split_qrels))
  if kind == "msmarco":
    if not (run and queries):
      raise ValueError("--dataset msmarco: give --run and --queries (and --qrels to score the rerank)")
    return Dataset("msmarco", (str(corpus or root / "collection.tsv"),), _one(queries), run, _one(qrels))
  raise ValueError(f"unknown --dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  group = parser.add_argument_group("benchmarks in their published layouts (rrjax.data.benchmarks)")
  group.add_argument("--dataset", help=f"{' | '.join(DATASETS)}: read the inputs from --data_dir's layout")
  group.add_argument("--data_dir", help="the dataset's local folder (for BRIGHT, a snapshot of the hub dataset)")
  group.add_argument("--split", default="test", help="BEIR qrels split (qrels/SPLIT.tsv; default test)")
  return parser


def from_args(args: Any) -> Dataset:
  """The Dataset that a parsed command line (add_flags plus --corpus/--queries/--qrels/--run) names."""
  return resolve(getattr(args, "dataset", None), getattr(args, "data_dir", None), split=getattr(args, "split", "test"),
                 corpus=args.corpus, queries=args.queries, qrels=args.qrels, run=args.run)


def task_list(text: str | None) -> list[str]:
  """`--tasks a,b` as BRIGHT task names (all, in table order, when empty)."""
  if not text:
    return list(BRIGHT_TASKS)
  return list(dict.fromkeys(bright_task(t) for t in text.split(",") if t.strip()))

