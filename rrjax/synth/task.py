"""The embedded synthetic reasoning-intensive ranking task, its lexical (BM25) first stage, and TREC writers.

A query states a numeric condition, each passage states a fact, and relevance is a comparison:

  query    "Which items cost less than 7?"
  passages "item lamp costs 5" (relevant), "item cup costs 7" (not), "item pen costs 9" (not), ...

Word overlap cannot tell relevant from irrelevant passages: every passage shares the same words with
the query ("items"/"item" and "cost"/"costs" differ, so they do not even match), and the only token a
passage can share with the query is the threshold digit, which belongs to *boundary* passages
("costs 7" for "less than 7") that are never relevant. The lexical first stage is therefore no better
than chance and is actively misled by boundary distractors, while one comparison per passage solves
the task exactly. Values are single digits (one Qwen2.5 token each) and passages are five tokens, so
a 2-layer model can learn the comparison table (2 ops x 10 x 10) on a CPU.

Every query has its own candidate pool (its passages), so the "retrieval" run is the lexical scorer's
order of that pool: BM25 with the bm25s library (rrjax.data.bm25, the index over the split's corpus, single
characters kept as tokens so that digits count; ties broken by a seeded shuffle so the run has distinct
scores and trec_eval's docid tie-break never decides).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rrjax import fileio
from rrjax.data import trec

NAMES = ("apple", "bread", "chair", "lamp", "shoe", "book", "cup", "pen", "coat", "hat", "desk", "bowl",
         "fork", "ring", "bell", "kite", "drum", "rope", "box", "bag", "sock", "key", "mug", "vase", "sofa",
         "bed", "map", "clock", "tent", "boat")
OPS = ("less", "more")
DATASET = "rrjax-synth"
QUERY_TEMPLATE = "Which items cost {op} than {threshold}?"
PASSAGE_TEMPLATE = "item {name} costs {value}"
QUERY_RE = re.compile(r"^Which items cost (less|more) than (\d+)\?$")
PASSAGE_RE = re.compile(r"^item (\w+) costs (\d+)$")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Size and difficulty of the synthetic task (everything is a function of these and the seed)."""

  seed: int = 0
  num_train: int = 1000
  num_test: int = 100
  passages_per_query: int = 10
  # Held-out pools may be larger than one window, so that reranking them needs the sliding window.
  test_passages_per_query: int | None = None  # None: passages_per_query
  min_relevant: int = 1
  max_relevant: int = 3
  max_value: int = 9            # values and thresholds are in [0, max_value]
  boundary_prob: float = 0.7    # chance that a query gets 1-2 lexical distractors (value == threshold)
  dataset: str = DATASET

  def __post_init__(self):
    if not 1 <= self.passages_per_query <= 20:
      raise ValueError(f"passages_per_query must be in [1, 20] (one window), got {self.passages_per_query}")
    if self.test_passages_per_query is not None and not self.max_relevant < self.test_passages_per_query <= len(NAMES):
      raise ValueError(f"test_passages_per_query must be in ({self.max_relevant}, {len(NAMES)}], "
                       f"got {self.test_passages_per_query}")
    if not 1 <= self.min_relevant <= self.max_relevant < self.passages_per_query:
      raise ValueError("need 1 <= min_relevant <= max_relevant < passages_per_query")
    if self.max_value < 1 or self.num_train < 0 or self.num_test < 0:
      raise ValueError("max_value must be >= 1 and query counts >= 0")

  def pool_size(self, split: str) -> int:
    """Candidates per query in `split`."""
    if split == "test" and self.test_passages_per_query is not None:
      return self.test_passages_per_query
    return self.passages_per_query


@dataclasses.dataclass(frozen=True)
class SyntheticQuery:
  """One query with its candidate passages (generation order) and the ground truth."""

  qid: str
  split: str
  text: str
  op: str
  threshold: int
  docids: tuple[str, ...]
  passages: tuple[str, ...]
  values: tuple[int, ...]
  relevant: frozenset[str]


def is_relevant(op: str, value: int, threshold: int) -> bool:
  return value < threshold if op == "less" else value > threshold


def _query(rng: np.random.Generator, cfg: TaskConfig, split: str, i: int) -> SyntheticQuery:
  op = OPS[int(rng.integers(len(OPS)))]
  # Thresholds that leave both a relevant and an irrelevant value range.
  t = int(rng.integers(1, cfg.max_value + 1)) if op == "less" else int(rng.integers(0, cfg.max_value))
  rel_values = list(range(0, t)) if op == "less" else list(range(t + 1, cfg.max_value + 1))
  irr_values = list(range(t, cfg.max_value + 1)) if op == "less" else list(range(0, t + 1))
  n = cfg.pool_size(split)
  n_rel = int(rng.integers(cfg.min_relevant, cfg.max_relevant + 1))
  n_boundary = int(rng.integers(1, 3)) if rng.random() < cfg.boundary_prob else 0
  n_boundary = min(n_boundary, n - n_rel)
  values = ([int(rng.choice(rel_values)) for _ in range(n_rel)] + [t] * n_boundary
            + [int(rng.choice(irr_values)) for _ in range(n - n_rel - n_boundary)])
  order = rng.permutation(n)
  values = [values[j] for j in order]
  names = [NAMES[j] for j in rng.choice(len(NAMES), size=n, replace=False)]
  qid = f"{split}-q{i:05d}"
  docids = tuple(f"{qid}-p{j:02d}" for j in range(n))
  passages = tuple(PASSAGE_TEMPLATE.format(name=nm, value=v) for nm, v in zip(names, values))
  relevant = frozenset(d for d, v in zip(docids, values) if is_relevant(op, v, t))
  return SyntheticQuery(qid, split, QUERY_TEMPLATE.format(op=op, threshold=t), op, t, docids, passages,
                        tuple(values), relevant)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  config: TaskConfig
  queries: tuple[SyntheticQuery, ...]

  def split(self, name: str) -> list[SyntheticQuery]:
    if name not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return [q for q in self.queries if q.split == name]


def generate(config: TaskConfig = TaskConfig()) -> SyntheticTask:
  """The task, deterministic in `config` (numpy PCG64 seeded with config.seed)."""
  rng = np.random.default_rng(config.seed)
  queries = [_query(rng, config, "train", i) for i in range(config.num_train)]
  queries += [_query(rng, config, "test", i) for i in range(config.num_test)]
  return SyntheticTask(config, tuple(queries))


# ---------------------------------------------------------------- lexical first stage

TOKENS = r"(?u)\b\w+\b"  # words and single digits (bm25s's default drops one-character tokens); no stemming


def first_stage_run(queries: Sequence[SyntheticQuery], seed: int = 0) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}}: BM25 (bm25s, indexed over the queries' passages) of each query's own pool;
  distinct scores, seeded tie-breaks."""
  from rrjax.data.bm25 import BM25Config, Index

  docs = [(d, p) for q in queries for d, p in zip(q.docids, q.passages)]
  index = Index.build(docs, BM25Config(token_pattern=TOKENS))
  row = {d: i for i, (d, _) in enumerate(docs)}
  rng = np.random.default_rng(seed + 7919)
  run = {}
  for q in queries:
    scores = index.scores(q.text)[[row[d] for d in q.docids]].astype(np.float64)
    tiebreak = rng.permutation(len(q.passages))  # rank within ties, 0 = first
    order = sorted(range(len(q.passages)), key=lambda j: (-scores[j], tiebreak[j]))
    n = len(order)
    # Scores are strictly decreasing in rank; the BM25 score stays readable in the integer part.
    run[q.qid] = {q.docids[j]: float(round(scores[j], 6)) + (n - r) / (n + 1) * 1e-3 for r, j in enumerate(order)}
  return run


def oracle_run(queries: Sequence[SyntheticQuery]) -> dict[str, dict[str, float]]:
  """The ground-truth ranking (relevant first, each group in generation order) as a run."""
  run = {}
  for q in queries:
    order = [d for d in q.docids if d in q.relevant] + [d for d in q.docids if d not in q.relevant]
    run[q.qid] = {d: float(len(order) - r) for r, d in enumerate(order)}
  return run


def qrels(queries: Sequence[SyntheticQuery]) -> dict[str, dict[str, int]]:
  """Every candidate judged: 1 relevant, 0 not."""
  return {q.qid: {d: int(d in q.relevant) for d in q.docids} for q in queries}


def topics(queries: Sequence[SyntheticQuery]) -> dict[str, str]:
  return {q.qid: q.text for q in queries}


def corpus(queries: Sequence[SyntheticQuery]) -> dict[str, str]:
  return {d: p for q in queries for d, p in zip(q.docids, q.passages)}


def write_corpus(path, docs: Mapping[str, str | Mapping[str, str]]) -> None:
  """jsonl `{"docid", "text"[, "title"]}`, readable by rrjax.data.trec.read_corpus (atomic)."""
  with fileio.atomic_open(path) as f:
    for docid, doc in docs.items():
      row = {"docid": docid, **({"text": doc} if isinstance(doc, str) else dict(doc))}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_split(task: SyntheticTask, split: str, out_dir) -> dict[str, str]:
  """corpus.jsonl, topics.tsv, qrels.txt and run.lexical.txt for one split; returns their paths."""
  out = Path(out_dir) / split
  qs = task.split(split)
  paths = {name: str(out / file) for name, file in (
      ("corpus", "corpus.jsonl"), ("queries", "topics.tsv"), ("qrels", "qrels.txt"), ("run", "run.lexical.txt"))}
  write_corpus(paths["corpus"], corpus(qs))
  trec.write_topics(paths["queries"], topics(qs))
  trec.write_qrels(paths["qrels"], qrels(qs))
  trec.write_run(paths["run"], first_stage_run(qs, task.config.seed), tag="bm25")
  return paths


def measure(queries: Sequence[SyntheticQuery], seed: int = 0) -> dict[str, float]:
  """nDCG@10 (trec_eval semantics, rrjax.eval) of the lexical first stage and of the oracle."""
  from rrjax import eval as eval_lib
  judged = qrels(queries)
  out = {}
  for name, run in (("first_stage", first_stage_run(queries, seed)), ("oracle", oracle_run(queries))):
    out[name] = eval_lib.evaluate(judged, run, ["ndcg@10"])["mean"]["ndcg@10"]
  return out
