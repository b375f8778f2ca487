"""Pipeline inputs: the synthetic task's splits, or a TREC run with topics, corpus and optional answers;
and `synthesize_task`, the whole pipeline over the synthetic task."""

from __future__ import annotations

from pathlib import Path

from rrjax.data import trec
from rrjax.synth import task as task_lib
from rrjax.synth.formats import write_labelled_set
from rrjax.synth.pipeline import QueryInput, SynthConfig, Teacher, synthesize


def task_inputs(task: task_lib.SyntheticTask, split: str, max_window: int = 20) -> list[QueryInput]:
  """The split's queries with candidates in first-stage (lexical) order."""
  qs = task.split(split)
  run = task_lib.first_stage_run(qs, task.config.seed)
  out = []
  for q in qs:
    order = [d for d, _ in trec.ranked(run[q.qid])][:max_window]
    text = dict(zip(q.docids, q.passages))
    out.append(QueryInput(q.qid, q.text, tuple(order), tuple(text[d] for d in order), dataset=task.config.dataset))
  return out


def file_inputs(run_path, queries_path, corpus_path, answers_path=None, *, max_window: int = 20,
                dataset: str = "") -> list[QueryInput]:
  """Queries of a TREC run (in run order) with their top-`max_window` candidates from the corpus."""
  run, topics, docs = trec.read_run(run_path), trec.read_topics(queries_path), trec.read_corpus(corpus_path)
  answers = trec.read_topics(answers_path) if answers_path else {}
  out = []
  for qid, scored in run.items():
    if qid not in topics:
      raise ValueError(f"{run_path}: query {qid!r} is not in {queries_path}")
    docids = [d for d, _ in trec.ranked(scored)][:max_window]
    missing = next((d for d in docids if d not in docs), None)
    if missing is not None:
      raise ValueError(f"{run_path}: docid {missing!r} (query {qid!r}) is not in {corpus_path}")
    out.append(QueryInput(qid, topics[qid], tuple(docids), tuple(docs[d] for d in docids), answers.get(qid), dataset))
  return out


def synthesize_task(task: task_lib.SyntheticTask, out_dir, teacher: Teacher, tokenizer,
                    config: SynthConfig = SynthConfig()) -> dict:
  """Labels both splits of the synthetic task with `teacher` and writes, per split, the TREC files
  (corpus, topics, qrels, lexical run) and the labelled set; returns the report (counts, files, and the
  held-out first-stage vs oracle nDCG@10)."""
  out = Path(out_dir)
  report: dict = {}
  for split in task_lib.SPLITS:
    files = task_lib.write_split(task, split, out)
    inputs = task_inputs(task, split, config.max_window)
    samples, rep = synthesize(inputs, teacher, config)
    files |= write_labelled_set(out / split, samples, inputs, tokenizer,
                                max_passage_tokens=config.max_passage_tokens, split=split)
    report[split] = {"labelled": rep.as_dict(), "files": files}
  report["heldout_ndcg10"] = task_lib.measure(task.split("test"), task.config.seed)
  return report
