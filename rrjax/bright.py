"""`python -m rrjax.bright`: the paper's BRIGHT table (ReasonRank's Table 1 layout) from one command.

  python -m rrjax.bright --first-stage-only [--tasks biology,pony] [--out DIR]
  python -m rrjax.bright --model M --data_dir D [--tasks t1,t2] [--gin_file F] [--gin_param P] [--out DIR]
      [any rrjax.rerank flag, e.g. --max-new-tokens 3172 --batch-size 64]

Every (chosen) task is reranked as ReasonRank does it: `python -m rrjax.rerank --dataset bright:TASK` over a
local snapshot D of the `xlangai/BRIGHT` hub dataset (the original queries, gold_ids qrels, documents cut to
512 tokens: configs/rerank/bright.gin, for a Qwen3 checkpoint (model_type qwen3: ReasonRank-8B) also
configs/rerank/reasonrank_8b.gin (upstream's rank_GPT_qwen3 prompt and sampling), then your gin files and flags,
which win) starting from ReasonRank's bundled
first-stage runs (ReasonIR-8B on GPT-4 reasoning queries, top-100). Each task writes DIR/TASK.trec and its
report DIR/TASK.json; a task whose report exists is not redone (the settings must match). The table (nDCG@10
x 100 of the first stage and of the reranker per task, and their averages) is printed and written to
DIR/bright_table.md and .json. `--first-stage-only` needs no model and no documents: it scores the bundled runs
against the bundled qrels and prints the first-stage row (the paper's ReasonIR row, average 30.59).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

from rrjax import cli, distributed, fileio
from rrjax.data import benchmarks

FIRST_STAGE = "ReasonIR (first stage)"
METRIC = "ndcg@10"
TABLE = "bright_table"
OWN_FLAGS = ("--out", "--dataset", "--data_dir", "--corpus", "--queries", "--qrels", "--run", "--model")


def first_stage(tasks: Sequence[str]) -> dict[str, dict]:
  """{task: {ndcg@10, num_queries, run_lines_skipped}} of the bundled runs against the bundled qrels."""
  from rrjax.data import trec
  from rrjax.eval import evaluate

  out = {}
  for task in tasks:
    run = trec.read_run(benchmarks.bundled_run(task), skip_malformed=True)  # as upstream: 6 fields or skipped
    qrels = trec.read_qrels(benchmarks.bundled_qrels(task))
    result = evaluate(qrels, run, [METRIC])
    out[task] = {METRIC: result["mean"][METRIC], "num_queries": len(result["per_query"]),
                 "run_lines_skipped": run.skipped}
  return out


def _average(values: Mapping[str, float]) -> float:
  return sum(values.values()) / len(values)


def table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> str:
  """Markdown: a column per task (the papers' names and order) and the average; values x 100, 2 decimals."""
  head = ["", *(benchmarks.BRIGHT_TASKS[t] for t in tasks), "Avg."]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, values in rows.items():
    cells = [f"{100 * values[t]:.2f}" for t in tasks] + [f"{100 * _average({t: values[t] for t in tasks}):.2f}"]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_table(out: Path, rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], extra: Mapping) -> str:
  text = table(rows, tasks)
  if distributed.is_primary():
    fileio.write_text(out / f"{TABLE}.md", text + "\n")
    summary = {"metric": METRIC, "tasks": list(tasks),
               "rows": {label: {t: values[t] for t in tasks} for label, values in rows.items()},
               "average": {label: _average({t: values[t] for t in tasks}) for label, values in rows.items()},
               **extra}
    fileio.write_text(out / f"{TABLE}.json", json.dumps(summary, indent=1) + "\n")
  return text


def _report_skips(stats: Mapping[str, Mapping]) -> None:
  for task, s in stats.items():
    if s.get("run_lines_skipped"):
      print(f"rrjax.bright: {task}: skipped {s['run_lines_skipped']} first-stage run lines whose docids contain "
            "spaces (not 6 fields), as ReasonRank does", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
  # No abbreviations: the rerank flags that pass through must not be taken for ours (--mode for --model).
  ap = argparse.ArgumentParser(prog="python -m rrjax.bright", description=__doc__.splitlines()[0], allow_abbrev=False,
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--first-stage-only", action="store_true", help="score the bundled first-stage runs only")
  ap.add_argument("--model", help="a Hugging Face Qwen2 or Qwen3 directory or an rrjax checkpoint")
  ap.add_argument("--data_dir", help="a local snapshot of the xlangai/BRIGHT dataset (or the hub cache)")
  ap.add_argument("--tasks", help=f"comma-separated (default all 12: {','.join(benchmarks.BRIGHT_TASKS)})")
  ap.add_argument("--gin_file", action="append", default=[], help="gin file(s) after configs/rerank/bright.gin")
  ap.add_argument("--gin_param", action="append", default=[], help="e.g. 'RerankSettings.window = 20'")
  ap.add_argument("--out", help="where the runs, reports and table go (default runs/bright)")
  ap.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on accelerators)")
  distributed.add_flags(ap)
  return ap


# model_type -> the rerank settings its released models run with (before the user's gin files and flags)
FAMILY_GIN = {"qwen3": "reasonrank_8b.gin"}


def family_gin_files(model: str) -> list[str]:
  """The gin files a checkpoint's family adds: ReasonRank-8B's prompt and decoding for a Qwen3 one."""
  from rrjax.checkpoints import load_config
  family = FAMILY_GIN.get(load_config(model).model_type)
  return [family] if family else []


def _rerank_argv(args, task: str, out: Path, passthrough: Sequence[str]) -> list[str]:
  argv = ["--model", args.model, "--dataset", f"bright:{task}", "--data_dir", args.data_dir,
          "--out", str(out / f"{task}.trec"), "--gin_file", "bright.gin"]
  for f in family_gin_files(args.model) + args.gin_file:
    argv += ["--gin_file", f]
  for p in args.gin_param:
    argv += ["--gin_param", p]
  return argv + (["--dtype", args.dtype] if args.dtype else []) + list(passthrough)


def rerank_tasks(args, tasks: Sequence[str], out: Path, passthrough: Sequence[str]) -> dict[str, dict]:
  """{task: report} for every task, reranking those without a finished report (with one model for all)."""
  from rrjax.rerank import cli as rerank_cli
  from rrjax.rerank import report as report_lib

  loaded = None
  reports = {}
  for task in tasks:
    argv = _rerank_argv(args, task, out, passthrough)
    settings = rerank_cli.resolve_settings(rerank_cli.build_parser().parse_args(argv))
    report = report_lib.finished_report(out / f"{task}.json", dataclasses.asdict(settings), str(args.model))
    if report is not None:
      print(f"rrjax.bright: {task}: done before, reusing {out / f'{task}.json'}", file=sys.stderr)
    else:
      if loaded is None:
        distributed.initialize_from_args(args)
        loaded = rerank_cli.load_model(rerank_cli.build_parser().parse_args(argv), settings)
      print(f"rrjax.bright: {task}: reranking", file=sys.stderr)
      rerank_cli.main(argv, loaded=loaded)
      report = json.loads((out / f"{task}.json").read_text())
    reports[task] = report
  return reports


def main(argv: Sequence[str] | None = None) -> int:
  args, passthrough = build_parser().parse_known_args(argv)
  tasks = benchmarks.task_list(args.tasks)
  out = Path(args.out or "runs/bright")
  if args.first_stage_only:
    if passthrough:
      raise ValueError(f"--first-stage-only takes no rerank flags, got {' '.join(passthrough)}")
    stats = first_stage(tasks)
    _report_skips(stats)
    rows = {FIRST_STAGE: {t: s[METRIC] for t, s in stats.items()}}
    text = table(rows, tasks) if args.out is None else write_table(out, rows, tasks, {"first_stage": stats})
    print(text)
    return 0
  if not args.model or not args.data_dir:
    raise ValueError("give --model and --data_dir (a snapshot of xlangai/BRIGHT), or --first-stage-only")
  clash = [a for a in passthrough if a.split("=")[0] in OWN_FLAGS]
  if clash:
    raise ValueError(f"rrjax.bright sets {', '.join(clash)} for each task itself")
  reports = rerank_tasks(args, tasks, out, passthrough)
  stats = {t: {"num_queries": r["metrics"]["num_queries"], **{k: v for k, v in r["inputs"].items()
                                                                if k in ("run_lines_skipped", "excluded_candidates")}}
           for t, r in reports.items()}
  _report_skips(stats)
  label = f"rrjax reranker ({Path(args.model).name})"
  rows = {FIRST_STAGE: {t: r["metrics"]["first_stage"][METRIC] for t, r in reports.items()},
          label: {t: r["metrics"]["reranked"][METRIC] for t, r in reports.items()}}
  print(write_table(out, rows, tasks, {"model": str(args.model), "tasks_detail": stats,
                                       "settings": reports[tasks[0]]["settings"]}))
  return 0


def console() -> None:
  """The `rrjax-bright` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.bright")
