"""Rerank a first-stage run: `python -m rrjax.rerank --model M --run R --queries Q --corpus C --out OUT.trec`.

Modes: `listwise` (ReasonRank: top-100, windows of 20, stride 10, back to front, every query's k-th window
in one batch), `full` (one prompt over all top-k passages) and `pointwise` (Rank1). Settings come from
upstream's defaults, then `--gin_file`/`--gin_param` (`RerankSettings.window = 20`, see configs/rerank/),
then flags. With a RankGPT json as --corpus, --run and --queries default to that file's. Every input is
read and checked before the model loads; bad input is one stderr line naming the file, line and id, exit 2,
and nothing written. The run (OUT.trec) and a report (OUT.json: settings, per-query windows, tokens, parser
fallbacks, throughput, metrics against --qrels) are written atomically at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rrjax.data import trec
from rrjax.ranking import rerank_loop as loop
from rrjax.ranking.pointwise import rank1_label_ids, rank1_reasoning
from rrjax.ranking.prompt import MODES as PROMPT_MODES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "rerank"


@dataclasses.dataclass(frozen=True)
class RerankSettings:
  """Reranking settings; the defaults are upstream's (run_rank_llm.sh, rank_listwise_os_llm.py)."""

  mode: str = "listwise"  # listwise | full | pointwise
  top_k: int = 100  # candidates reranked per query (upstream retrieval_num); the rest are dropped
  window: int = 20
  stride: int = 10
  max_passage_tokens: int = 512  # 512 on BRIGHT, 100 on BEIR/DL (upstream DOC_MAXLEN)
  max_new_tokens: int = 3172  # reasoning_maxlen 3072 + 100
  min_new_tokens: int = 0
  batch_size: int | None = None  # rows per decode call; None: every prompt of a round in one call
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  prompt_mode: str = "reasoning"  # reasoning (rank_GPT_reasoning) | plain (rank_GPT)
  max_queries: int | None = None  # only the run's first N queries
  tag: str = "rrjax"

  def __post_init__(self):
    if self.mode not in loop.MODES:
      raise ValueError(f"mode must be one of {loop.MODES}, got {self.mode!r}")
    if self.prompt_mode not in PROMPT_MODES:
      raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
    for name in ("top_k", "window", "stride", "max_new_tokens"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    for name in ("batch_size", "max_queries"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if self.max_passage_tokens < 0 or self.min_new_tokens < 0:
      raise ValueError("max_passage_tokens and min_new_tokens must be >= 0")
    if self.min_new_tokens > self.max_new_tokens:
      raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
    if not self.tag or any(c.isspace() for c in self.tag):
      raise ValueError(f"tag must be non-empty without whitespace: {self.tag!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(RerankSettings))

# ---------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Inputs:
  queries: list[loop.Query]
  first_stage: dict[str, dict[str, float]]  # the reranked queries' top-k, as read
  sources: dict[str, str]


def _is_rankgpt(path: str | os.PathLike) -> bool:
  """A RankGPT json is one JSON list; a jsonl corpus starts with an object."""
  if not os.path.exists(path):
    raise trec.TrecFormatError(path, None, "no such file")
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      head = f.read(4096).lstrip()
  except (OSError, EOFError) as e:
    raise trec.TrecFormatError(path, None, f"cannot read: {e}") from None
  return head.startswith(b"[")


def _line_of(path: str | os.PathLike, qid: str, docid: str | None = None) -> int | None:
  """The first line of a TREC run with this qid (and docid): only looked up to word an error."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      fields = line.split()
      if len(fields) >= 3 and fields[0] == qid and (docid is None or fields[2] == docid):
        return n
  return None


def load_inputs(corpus: str | os.PathLike, run: str | os.PathLike | None = None,
                queries: str | os.PathLike | None = None, *, top_k: int = 100,
                max_queries: int | None = None) -> Inputs:
  """Reads and cross-checks the run, topics and corpus; every query of the run must have its text and
  every candidate its passage. Candidates are in trec_eval order (score desc, docid desc)."""
  if _is_rankgpt(corpus):
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
    out.append(loop.Query(qid, topics[qid], tuple(loop.Candidate(d, s, docs[d]) for d, s in hits)))
    kept[qid] = dict(hits)
  return Inputs(out, kept, {"run": run_name, "queries": topics_name, "corpus": str(corpus)})


# ---------------------------------------------------------------- the model side


class ModelBackend:
  """`complete` (listwise) and `score` (Rank1) callables over `rrjax.generate`; it also times them."""

  def __init__(self, model, tokenizer, settings: RerankSettings, *, mesh=None):
    self.model, self.tokenizer, self.settings, self.mesh = model, tokenizer, settings, mesh
    self.generate_seconds = 0.0
    self.calls = 0

  def _generate(self, ids, **kw):
    import rrjax

    s = self.settings
    kw = {"temperature": s.temperature, "top_p": s.top_p, "stop_ids": self.tokenizer.stop_ids, **kw}
    t0 = time.perf_counter()
    # A new seed per call, so sampled rounds do not replay one random stream.
    gen = rrjax.generate(self.model, ids, seed=s.seed + self.calls, mesh=self.mesh, batch_size=s.batch_size, **kw)
    self.generate_seconds += time.perf_counter() - t0
    self.calls += 1
    return gen

  def _answer_budget(self, n: int) -> int:
    """Upstream's rank_GPT (plain) budget: exactly the tokens of `[1] > [2] > ... > [n]`."""
    return len(self.tokenizer.encode(" > ".join(f"[{i + 1}]" for i in range(n))))

  def complete(self, prompts: Sequence[str]) -> list[loop.Completion]:
    s = self.settings
    ids = self.tokenizer.encode_batch(list(prompts))
    groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
      if s.prompt_mode == "plain":
        n = getattr(p, "end", 0) - getattr(p, "start", 0) or s.window
        budget = self._answer_budget(n)
        groups[(budget, budget)].append(i)
      else:
        groups[(s.max_new_tokens, s.min_new_tokens)].append(i)
    out: list[loop.Completion | None] = [None] * len(prompts)
    for (max_new, min_new), rows in groups.items():
      gen = self._generate([ids[i] for i in rows], max_new_tokens=max_new, min_new_tokens=min_new)
      for r, i in enumerate(rows):
        text = self.tokenizer.decode(gen.tokens[r], skip_special_tokens=True)
        out[i] = loop.Completion(text, len(ids[i]), gen.lengths[r], gen.finish_reasons[r])
    return out

  def score(self, prompts: Sequence[str]) -> list[loop.PointwiseScore]:
    """Rank1: reason, then score the token after `</think>` restricted to true/false."""
    import numpy as np

    from rrjax.decode import Buckets

    s = self.settings
    true_id, false_id = rank1_label_ids(self.tokenizer)
    ids = self.tokenizer.encode_batch(list(prompts))
    gen = self._generate(ids, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens)
    reasoning = [rank1_reasoning(self.tokenizer.decode(t, skip_special_tokens=True)) for t in gen.tokens]
    # One forward pass over prompt + reasoning + `</think>`: the last position's logits are the label's.
    full = [p + self.tokenizer.encode(text) for p, (text, _) in zip(ids, reasoning)]
    last = self._generate(full, max_new_tokens=1, temperature=0.0, stop_ids=(), return_logits=True,
                          buckets=Buckets(min_new_tokens=1))
    out = []
    for i, (_, source) in enumerate(reasoning):
      logits_V = last.logits[i][0]
      margin = float(logits_V[true_id]) - float(logits_V[false_id])
      if math.isfinite(margin):
        p = float(1.0 / (1.0 + np.exp(-np.float64(margin))))
      else:
        p, source = 0.5, "failed"
      out.append(loop.PointwiseScore(p, len(ids[i]), gen.lengths[i], source))
    return out


@dataclasses.dataclass(frozen=True)
class RerankOutput:
  ranked: list[loop.Ranked]
  wall_seconds: float
  generate_seconds: float


def rerank(queries: Sequence[loop.Query], model, tokenizer, settings: RerankSettings = RerankSettings(), *,
           mesh=None, progress: bool = False) -> RerankOutput:
  """Reranks `queries` with `model` in the settings' mode; a tqdm bar (stderr) over windows when asked."""
  from tqdm import tqdm

  s = settings
  backend = ModelBackend(model, tokenizer, s, mesh=mesh)
  t0 = time.perf_counter()
  if s.mode == "pointwise":
    total = sum(min(len(q.candidates), s.top_k) for q in queries)
    bar = tqdm(total=total, desc="rank1 passages", unit="passage", file=sys.stderr, disable=not progress)
    chunk = max(s.batch_size or 0, 256)  # the bar moves every chunk; generate splits by batch_size anyway
    with bar:
      ranked = loop.rerank_pointwise(queries, backend.score, tokenizer, top_k=s.top_k,
                                     max_passage_tokens=s.max_passage_tokens, chunk_size=chunk, progress=bar.update)
  else:
    full = s.mode == "full"
    total = loop.count_windows([len(q.candidates) for q in queries], window=s.window, stride=s.stride,
                               top_k=s.top_k, full_list=full)
    bar = tqdm(total=total, desc="windows", unit="window", file=sys.stderr, disable=not progress)
    with bar:
      ranked = loop.rerank_listwise(queries, backend.complete, tokenizer, window=s.window, stride=s.stride,
                                    top_k=s.top_k, max_passage_tokens=s.max_passage_tokens,
                                    prompt_mode=s.prompt_mode, full_list=full, progress=bar.update)
  return RerankOutput(ranked, time.perf_counter() - t0, backend.generate_seconds)


# ---------------------------------------------------------------- report


def metric_names(top_k: int) -> list[str]:
  return ["ndcg@1", "ndcg@5", "ndcg@10", f"recall@{top_k}"]


def build_report(settings: RerankSettings, out: RerankOutput, *, sources: Mapping[str, str] | None = None,
                 metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
  """The JSON report: settings, per query (windows or Rank1 scores), totals, metrics."""
  per_query, parsers = {}, collections.Counter()
  prompt_tokens = generated_tokens = steps = 0
  for r in out.ranked:
    if r.pointwise is not None:
      scores = r.pointwise
      entry = {"documents": len(scores),
               "prompt_tokens": sum(x.prompt_tokens for x in scores.values()),
               "generated_tokens": sum(x.generated_tokens for x in scores.values()),
               "sources": dict(collections.Counter(x.source for x in scores.values())),
               "scores": {d: x.score for d, x in scores.items()}}
      parsers.update(entry["sources"])
      steps += len(scores)
    else:
      windows = [dataclasses.asdict(w) for w in r.windows]
      entry = {"windows": windows, "prompt_tokens": sum(w.prompt_tokens for w in r.windows),
               "generated_tokens": sum(w.generated_tokens for w in r.windows),
               "parsers": dict(collections.Counter(w.parser for w in r.windows))}
      parsers.update(entry["parsers"])
      steps += len(windows)
    prompt_tokens += entry["prompt_tokens"]
    generated_tokens += entry["generated_tokens"]
    per_query[r.qid] = entry
  n = len(out.ranked)
  totals = {"queries": n, "prompts" if settings.mode == "pointwise" else "windows": steps,
            "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "wall_seconds": out.wall_seconds, "generate_seconds": out.generate_seconds,
            "tokens_per_second": generated_tokens / out.generate_seconds if out.generate_seconds else None,
            "queries_per_second": n / out.wall_seconds if out.wall_seconds else None,
            "parsers" if settings.mode != "pointwise" else "sources": dict(parsers)}
  report = {"settings": dataclasses.asdict(settings), **(extra or {}), "inputs": dict(sources or {}),
            "totals": totals}
  if metrics is not None:
    report["metrics"] = dict(metrics)
  report["queries"] = per_query
  return report


def merge_reports(reports: Sequence[dict]) -> dict:
  """One report from the per-process reports of a multi-host run (a single report is returned as is)."""
  if len(reports) == 1:
    return reports[0]
  merged = {**reports[0], "queries": {q: e for r in reports for q, e in r["queries"].items()}}
  totals = dict(reports[0]["totals"])
  for key in ("queries", "windows", "prompts", "prompt_tokens", "generated_tokens"):
    if key in totals:
      totals[key] = sum(r["totals"][key] for r in reports)
  for key in ("wall_seconds", "generate_seconds"):
    totals[key] = max(r["totals"][key] for r in reports)
  counts = collections.Counter()
  for r in reports:
    counts.update(r["totals"].get("parsers") or r["totals"].get("sources") or {})
  totals["parsers" if "parsers" in totals else "sources"] = dict(counts)
  totals["tokens_per_second"] = totals["generated_tokens"] / totals["generate_seconds"] if totals["generate_seconds"] else None
  totals["queries_per_second"] = totals["queries"] / totals["wall_seconds"] if totals["wall_seconds"] else None
  totals["processes"] = len(reports)
  merged["totals"] = totals
  return merged


def evaluate_both(qrels, reranked: Mapping, first_stage: Mapping, top_k: int) -> dict:
  """NDCG@1/5/10 and Recall@k of the reranked run and of the first stage's top-k, trec_eval semantics."""
  from rrjax.eval import evaluate

  names = metric_names(top_k)
  ours = evaluate(qrels, reranked, names)
  base = evaluate(qrels, first_stage, names)
  return {"num_queries": len(ours["per_query"]), "reranked": ours["mean"], "first_stage": base["mean"]}


def report_path(out: str | os.PathLike) -> Path:
  """OUT.trec -> OUT.json (a .gz suffix is dropped first)."""
  out = Path(out)
  base = out.with_suffix("") if out.suffix == ".gz" else out
  path = base.with_suffix(".json")
  if path == out:
    raise ValueError(f"{out}: the run cannot end in .json (the report goes to {path})")
  return path


# ---------------------------------------------------------------- gin and the CLI

_GIN_FACTORY = None


def _gin_factory():
  global _GIN_FACTORY
  if _GIN_FACTORY is None:
    import importlib.util  # noqa: F401  gin 0.5.0 needs it loaded before relative includes

    import gin

    def settings_fields(**kwargs):
      return kwargs

    _GIN_FACTORY = gin.external_configurable(settings_fields, name="RerankSettings")
  return _GIN_FACTORY


def settings_from_gin(files: Sequence[str] = (), params: Sequence[str] = (),
                      base: RerankSettings = RerankSettings()) -> RerankSettings:
  """`base` with the `RerankSettings.field = value` bindings of gin files and parameters applied.

  Includes resolve against the including file's directory and configs/rerank/.
  """
  if not files and not params:
    return base
  factory = _gin_factory()
  import gin

  search = [Path(f).parent for f in files] + [CONFIG_DIR]
  for f in files:
    if not Path(f).is_file() and not (CONFIG_DIR / f).is_file():
      raise ValueError(f"{f}: gin file not found")
  with gin.unlock_config():
    gin.clear_config()
    for d in search:
      gin.add_config_file_search_path(str(d))
    try:
      gin.parse_config_files_and_bindings(list(files), list(params), finalize_config=False)
    except Exception as e:  # gin raises ValueError, RuntimeError, TokenError, IOError...
      raise ValueError(f"gin ({', '.join(map(str, files)) or '--gin_param'}): {' '.join(str(e).split())}") from None
    kwargs = factory()
  unknown = sorted(set(kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f"gin ({', '.join(map(str, files)) or '--gin_param'}): unknown RerankSettings field(s) "
                     f"{', '.join(unknown)}; known: {', '.join(FIELDS)}")
  return dataclasses.replace(base, **kwargs)


def _positive(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m rrjax.rerank", description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="a Hugging Face Qwen2 directory or an rrjax checkpoint")
  from rrjax import distributed
  distributed.add_flags(ap)
  ap.add_argument("--run", help="first-stage TREC run (default: the RankGPT --corpus's)")
  ap.add_argument("--queries", help="topics, tsv `qid<TAB>query` or jsonl (default: the RankGPT --corpus's)")
  ap.add_argument("--corpus", required=True, help="jsonl corpus, or a RankGPT json [{query, hits}]")
  ap.add_argument("--out", required=True, help="the reranked TREC run; the report goes next to it as .json")
  ap.add_argument("--qrels", help="TREC qrels: report NDCG@1/5/10 and Recall@k, ours and the first stage's")
  ap.add_argument("--gin_file", action="append", default=[], help="gin file(s) binding RerankSettings.*")
  ap.add_argument("--gin_param", action="append", default=[], help="e.g. 'RerankSettings.window = 20'")
  ap.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on accelerators)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  flags = ap.add_argument_group("settings (override gin; defaults are upstream's)")
  flags.add_argument("--mode", choices=loop.MODES)
  flags.add_argument("--top-k", type=_positive)
  flags.add_argument("--window", type=_positive)
  flags.add_argument("--stride", type=_positive)
  flags.add_argument("--max-passage-tokens", type=int)
  flags.add_argument("--max-new-tokens", type=_positive)
  flags.add_argument("--min-new-tokens", type=int)
  flags.add_argument("--batch-size", type=_positive, help="rows per decode call (default: a whole round)")
  flags.add_argument("--temperature", type=float)
  flags.add_argument("--top-p", type=float)
  flags.add_argument("--seed", type=int)
  flags.add_argument("--prompt-mode", choices=PROMPT_MODES)
  flags.add_argument("--max-queries", type=_positive, help="only the run's first N queries")
  flags.add_argument("--tag", help="the run's tag column")
  return ap


def resolve_settings(args: argparse.Namespace) -> RerankSettings:
  settings = settings_from_gin(args.gin_file, args.gin_param)
  flags = {f: getattr(args, f) for f in FIELDS if getattr(args, f, None) is not None}
  return dataclasses.replace(settings, **flags)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  settings = resolve_settings(args)
  out_path = Path(args.out)
  json_path = report_path(out_path)
  inputs = load_inputs(args.corpus, args.run, args.queries, top_k=settings.top_k, max_queries=settings.max_queries)
  qrels = trec.read_qrels(args.qrels) if args.qrels else None

  import rrjax
  from rrjax import tokenizer as tokenizer_lib

  from rrjax import distributed, multihost_rerank

  distributed.initialize_from_args(args)
  # One model per process on its own devices: with several hosts, each reranks its share of the queries.
  model = rrjax.from_pretrained(args.model, dtype=args.dtype)
  tokenizer = tokenizer_lib.load(args.model)
  outputs = []

  def rerank_share(share):
    outputs.append(rerank(share, model, tokenizer, settings, progress=not args.no_progress))
    return loop.to_run(outputs[-1].ranked)

  extra = {"model": str(args.model), "gin_files": list(args.gin_file), "gin_params": list(args.gin_param)}
  sources = {**inputs.sources, "qrels": args.qrels}
  # Written in reranked order; the slot scores keep trec_eval's order equal to it unless the first stage tied.
  reranked = multihost_rerank.rerank_to_run_file(inputs.queries, rerank_share, out_path, tag=settings.tag,
                                                 sort=False)
  if not outputs:  # more processes than queries: this one had none
    rerank_share([])
  reports = distributed.allgather_json(build_report(settings, outputs[0], sources=sources, extra=extra))
  report = merge_reports(reports)
  if qrels is not None:
    report["metrics"] = evaluate_both(qrels, reranked, inputs.first_stage, settings.top_k)
  if distributed.is_primary():
    with trec.atomic_open(json_path) as f:
      json.dump(report, f, indent=1)
      f.write("\n")
  metrics = report.get("metrics")
  totals = report["totals"]
  line = (f"rrjax.rerank: {totals['queries']} queries, {totals['generated_tokens']} generated tokens in "
          f"{totals['wall_seconds']:.1f}s -> {out_path}")
  if metrics is not None:
    line += "; " + ", ".join(f"{k} {v:.4f} (first stage {metrics['first_stage'][k]:.4f})"
                             for k, v in metrics["reranked"].items())
  print(line, file=sys.stderr)
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.rerank")
