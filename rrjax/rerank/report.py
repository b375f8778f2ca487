"""A rerank's report (settings, per-query windows or Rank1 scores, totals, metrics) and the one writer of a
rerank's outputs: the TREC run and its JSON report, each written atomically."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from rrjax import fileio
from rrjax.data import trec
from rrjax.rerank.runner import RerankOutput
from rrjax.rerank.settings import RerankSettings


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
  unit = "prompts" if settings.mode == "pointwise" else "windows"
  engine = out.engine
  totals = {"queries": n, unit: steps, "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "wall_seconds": out.wall_seconds, "generate_seconds": out.generate_seconds,
            "prefill_seconds": engine.get("prefill_seconds"), "decode_seconds": engine.get("decode_seconds"),
            "occupancy": engine.get("occupancy"),
            "tokens_per_second": generated_tokens / out.generate_seconds if out.generate_seconds else None,
            "queries_per_second": n / out.wall_seconds if out.wall_seconds else None,
            f"{unit}_per_second": steps / out.wall_seconds if out.wall_seconds else None,
            "schedule": settings.schedule if settings.mode != "pointwise" else None,
            "parsers" if settings.mode != "pointwise" else "sources": dict(parsers)}
  report = {"settings": dataclasses.asdict(settings), **(extra or {}), "inputs": dict(sources or {}),
            "totals": totals, "engine": dict(out.engine)}
  if metrics is not None:
    report["metrics"] = dict(metrics)
  report["queries"] = per_query
  return report


# What the console line says about outputs the parser could not read as intended (rrjax.ranking.parse SOURCES,
# rrjax.ranking.pointwise POINTWISE_SOURCES); the report has the per-query counts.
_FALLBACKS = {"last_answer": "read after the last <answer>", "whole_text": "read from the whole text",
              "unparsable": "unparsable (left in first-stage order)", "cut": "cut before </think>",
              "failed": "failed (scored 0.5)"}


def fallback_note(totals: Mapping[str, Any]) -> str | None:
  """'12 of 90 windows fell back: 10 read from the whole text, 2 unparsable (left in first-stage order)', or None
  when every window (Rank1: passage) was parsed as the model was trained to answer."""
  counts = totals.get("parsers") or totals.get("sources") or {}
  unit = "windows" if "parsers" in totals else "passages"
  fell = {k: v for k, v in counts.items() if k in _FALLBACKS and v}
  if not fell:
    return None
  what = ", ".join(f"{v} {_FALLBACKS[k]}" for k, v in sorted(fell.items(), key=lambda kv: -kv[1]))
  return f"{sum(fell.values())} of {sum(counts.values())} {unit} fell back: {what}"


def merge_reports(reports: Sequence[dict]) -> dict:
  """One report from the per-process reports of a multi-host run (a single report is returned as is)."""
  if len(reports) == 1:
    return reports[0]
  merged = {**reports[0], "queries": {q: e for r in reports for q, e in r["queries"].items()},
            "engine": {"per_process": [r.get("engine", {}) for r in reports]}}
  totals = dict(reports[0]["totals"])
  for key in ("queries", "windows", "prompts", "prompt_tokens", "generated_tokens"):
    if key in totals:
      totals[key] = sum(r["totals"][key] for r in reports)
  for key in ("wall_seconds", "generate_seconds", "prefill_seconds", "decode_seconds"):
    values = [r["totals"].get(key) for r in reports if r["totals"].get(key) is not None]
    totals[key] = max(values) if values else None
  steps = [r.get("engine", {}) for r in reports]
  slot_steps = sum(e.get("slot_steps", 0) for e in steps)
  totals["occupancy"] = sum(e.get("live_slot_steps", 0) for e in steps) / slot_steps if slot_steps else None
  counts = collections.Counter()
  for r in reports:
    counts.update(r["totals"].get("parsers") or r["totals"].get("sources") or {})
  totals["parsers" if "parsers" in totals else "sources"] = dict(counts)
  wall, generate = totals["wall_seconds"], totals["generate_seconds"]
  totals["tokens_per_second"] = totals["generated_tokens"] / generate if generate else None
  totals["queries_per_second"] = totals["queries"] / wall if wall else None
  for unit in ("windows", "prompts"):
    if unit in totals:
      totals[f"{unit}_per_second"] = totals[unit] / wall if wall else None
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


def finished_report(path: str | os.PathLike, settings: Mapping[str, Any], model: str) -> dict | None:
  """The saved report at `path` of a rerank done with these settings (dataclasses.asdict) and model, None if
  there is none; a ValueError if it was done differently (resuming would mix two configurations)."""
  path = Path(path)
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  if report.get("settings") != dict(settings) or report.get("model") != model:
    raise ValueError(f"{path}: this was reranked with other settings or another model; use another --out or "
                     "delete it")
  return report


def report_path(out: str | os.PathLike) -> Path:
  """OUT.trec -> OUT.json (a .gz suffix is dropped first)."""
  out = Path(out)
  base = out.with_suffix("") if out.suffix == ".gz" else out
  path = base.with_suffix(".json")
  if path == out:
    raise ValueError(f"{out}: the run cannot end in .json (the report goes to {path})")
  return path


def write_outputs(out: str | os.PathLike, run: Mapping[str, Mapping[str, float]], report: Mapping[str, Any], *,
                  tag: str = "rrjax") -> Path:
  """Writes the run (in the given order: the reranked one) to `out` and the report next to it; returns the
  report's path. Both appear whole or not at all."""
  path = report_path(out)
  trec.write_run(out, run, tag=tag, sort=False)
  with fileio.atomic_open(path) as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  return path
