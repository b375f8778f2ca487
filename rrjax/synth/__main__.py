"""`python -m rrjax.synth`: label ranking data with a teacher and write upstream's released formats.

Synthetic task (default; no --run):
  python -m rrjax.synth --out OUT [--seed 0 --num_train 1000 --num_test 100 --passages_per_query 10
      --test_passages_per_query N]
writes OUT/{train,test}/ with TREC files (corpus.jsonl, topics.tsv, qrels.txt, run.lexical.txt) and the
labelled set (training_data_all.jsonl, id_query/, id_doc/, sft.json, rl.parquet, rl.jsonl), and
OUT/report.json (counts, teacher stats, first-stage vs oracle nDCG@10 on the held-out split).
The default teacher is the programmatic one.

Your own queries (candidates = the top --max_window docs of a TREC run):
  python -m rrjax.synth --out OUT --run RUN --queries TOPICS --corpus CORPUS [--answers ANSWERS]
      --teacher chat --base_url URL --model NAME --api_key_env VAR [--max_concurrency 8]
writes the labelled set to OUT/ and a request cache to OUT/cache (rerun to resume). ANSWERS is tsv
`qid<TAB>answer` or jsonl {id, text}, like topics. --teacher local --checkpoint DIR uses an rrjax model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Sequence

from rrjax import cli, fileio
from rrjax.synth import task as task_lib
from rrjax.synth.client import ChatClient, ClientConfig
from rrjax.synth.formats import write_labelled_set
from rrjax.synth.inputs import file_inputs, synthesize_task
from rrjax.synth.pipeline import SynthConfig, synthesize
from rrjax.synth.teachers import ChatTeacher, LocalTeacher, ProgrammaticTeacher


def make_teacher(args, out: Path, tokenizer):
  if args.teacher == "programmatic":
    return ProgrammaticTeacher(), None
  if args.teacher == "chat":
    config = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env or None,
                          max_concurrency=args.max_concurrency, max_retries=args.max_retries,
                          timeout_s=args.timeout_s, temperature=args.temperature, max_tokens=args.max_tokens,
                          cache_dir=args.cache_dir or str(out / "cache"))
    client = ChatClient(config)
    teacher = ChatTeacher(client, tokenizer, args.max_passage_tokens, require_reasoning=not args.allow_no_reasoning)
    return teacher, client
  if not args.checkpoint:
    raise ValueError("--teacher local needs --checkpoint")
  from rrjax.checkpoints import from_pretrained
  return LocalTeacher(from_pretrained(args.checkpoint), tokenizer, max_new_tokens=args.max_new_tokens,
                      max_passage_tokens=args.max_passage_tokens), None


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rrjax.synth", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--teacher", choices=("programmatic", "chat", "local"), default="programmatic")
  p.add_argument("--alpha", type=float, default=0.4, help="self-consistency NDCG@10 threshold")
  p.add_argument("--max_window", type=int, default=20)
  p.add_argument("--max_passage_tokens", type=int, default=512)
  g = p.add_argument_group("synthetic task (when --run is not given)")
  for name, default in (("seed", 0), ("num_train", 1000), ("num_test", 100), ("passages_per_query", 10)):
    g.add_argument(f"--{name}", type=int, default=default)
  g.add_argument("--test_passages_per_query", type=int, default=None,
                 help="held-out pool size (default --passages_per_query); larger pools need the sliding window")
  g = p.add_argument_group("your queries")
  g.add_argument("--run"), g.add_argument("--queries"), g.add_argument("--corpus")
  g.add_argument("--answers", help="optional gold answers (tsv qid<TAB>answer or jsonl)")
  g.add_argument("--dataset", default="", help="the rows' dataset name")
  g = p.add_argument_group("chat teacher (OpenAI-compatible endpoint)")
  g.add_argument("--base_url", default=ClientConfig.base_url)
  g.add_argument("--model", default=ClientConfig.model)
  g.add_argument("--api_key_env", default=ClientConfig.api_key_env, help="NAME of the env var holding the key")
  g.add_argument("--max_concurrency", type=int, default=ClientConfig.max_concurrency)
  g.add_argument("--max_retries", type=int, default=ClientConfig.max_retries)
  g.add_argument("--timeout_s", type=float, default=ClientConfig.timeout_s)
  g.add_argument("--temperature", type=float, default=None)
  g.add_argument("--max_tokens", type=int, default=None)
  g.add_argument("--cache_dir", default=None, help="default OUT/cache")
  g.add_argument("--allow_no_reasoning", action="store_true", help="accept rankings without a reasoning chain")
  g = p.add_argument_group("local teacher")
  g.add_argument("--checkpoint")
  g.add_argument("--max_new_tokens", type=int, default=3172)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  from rrjax import tokenizer as tokenizer_lib
  out = Path(args.out)
  config = SynthConfig(alpha=args.alpha, max_window=args.max_window, max_passage_tokens=args.max_passage_tokens)
  tokenizer = tokenizer_lib.load()
  teacher, client = make_teacher(args, out, tokenizer)
  report: dict = {"teacher": teacher.name, "alpha": config.alpha}
  if args.run or args.queries or args.corpus:
    if not (args.run and args.queries and args.corpus):
      raise ValueError("give --run, --queries and --corpus together")
    inputs = file_inputs(args.run, args.queries, args.corpus, args.answers, max_window=config.max_window,
                         dataset=args.dataset)
    samples, rep = synthesize(inputs, teacher, config)
    report["labelled"] = rep.as_dict()
    report["files"] = write_labelled_set(out, samples, inputs, tokenizer,
                                         max_passage_tokens=config.max_passage_tokens)
  else:
    task = task_lib.generate(task_lib.TaskConfig(
        seed=args.seed, num_train=args.num_train, num_test=args.num_test,
        passages_per_query=args.passages_per_query, test_passages_per_query=args.test_passages_per_query))
    report["task"] = dataclasses.asdict(task.config)
    report |= synthesize_task(task, out, teacher, tokenizer, config)
  report["teacher_stats"] = dict(teacher.stats)
  if client is not None:
    report["client_stats"] = client.stats.as_dict()
  with fileio.atomic_open(out / "report.json") as f:
    json.dump(report, f, indent=1, default=str)
  print(json.dumps({k: report[k] for k in report if k in ("labelled", "heldout_ndcg10", "teacher_stats")}
                   | {s: report[s]["labelled"] for s in task_lib.SPLITS if s in report}))
  return 0


def console() -> None:
  """The `rrjax-synth` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="python -m rrjax.synth")
