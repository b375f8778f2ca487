"""Reranking on the real TREC DL19 BM25 top-100 (with passage text): the CLI with a tiny random model,
the lockstep window loop with scripted completions (identity, qrels oracle), Rank1 and full-list modes,
gin settings, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

from rrjax import rerank as rr
from rrjax import tokenizer as tokenizer_lib
from rrjax.data import trec
from rrjax.data.inputs import load_inputs
from rrjax.rerank.backend import ModelBackend
from rrjax.ranking import pointwise
from rrjax.ranking import rerank_loop as loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dl19(data_dir):
  return {"rankgpt": str(data_dir / "trec" / "BM25.dl19.top100.rankgpt.json.gz"),
          "qrels": str(data_dir / "trec" / "dl19" / "qrels.dl19-passage.txt.gz"),
          "run": str(data_dir / "trec" / "dl19" / "BM25.dl19.top100.trec.gz")}


@pytest.fixture(scope="module")
def inputs(dl19):
  return load_inputs(dl19["rankgpt"])


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  from flax import nnx

  import rrjax
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  path = tmp_path_factory.mktemp("model") / "tiny"
  rrjax.save_pretrained(Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(0)), path)
  return str(path)


def _answer(order):
  return "<think>x</think> <answer>" + " > ".join(f"[{j + 1}]" for j in order) + "</answer>"


def _check_run(path, expected):
  """Every query has exactly its candidates, and pytrec_eval parses the file."""
  import pytrec_eval

  run = trec.read_run(path)
  assert {q: set(d) for q, d in run.items()} == {q: set(d) for q, d in expected.items()}
  with open(path) as f:
    parsed = pytrec_eval.parse_run(f)
  assert {q: set(d) for q, d in parsed.items()} == {q: set(d) for q, d in expected.items()}
  return run


# ---------------------------------------------------------------- the CLI, tiny random model


def test_cli_listwise_subprocess(tiny_dir, dl19, tmp_path):
  out = tmp_path / "reranked.trec"
  cmd = [sys.executable, "-m", "rrjax.rerank", "--model", tiny_dir, "--corpus", dl19["rankgpt"],
         "--qrels", dl19["qrels"], "--out", str(out), "--max-queries", "2", "--max-new-tokens", "8",
         "--gin_file", os.path.join(ROOT, "configs", "rerank", "beir_dl.gin"), "--max-passage-tokens", "32"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  first = trec.read_run(dl19["run"])
  qids = list(first)[:2]
  run = _check_run(out, {q: first[q] for q in qids})
  assert all(len(run[q]) == 100 for q in qids)
  report = json.loads((tmp_path / "reranked.json").read_text())
  assert report["settings"]["max_passage_tokens"] == 32  # the flag beats the gin file's 100
  assert report["settings"]["window"] == 20 and report["settings"]["max_new_tokens"] == 8
  assert report["totals"]["windows"] == 18 and report["totals"]["generated_tokens"] <= 18 * 8
  for q in qids:
    windows = report["queries"][q]["windows"]
    assert [(w["start"], w["end"]) for w in windows] == [(s, s + 20) for s in range(80, -1, -10)]
    assert all(w["parser"] in ("answer_tag", "last_answer", "whole_text", "unparsable") for w in windows)
    assert all(w["prompt_tokens"] > 0 for w in windows)
  metrics = report["metrics"]
  assert set(metrics["reranked"]) == {"ndcg@1", "ndcg@5", "ndcg@10", "recall@100"}
  assert metrics["reranked"]["recall@100"] == pytest.approx(metrics["first_stage"]["recall@100"])
  assert "windows" in proc.stderr  # the tqdm bar
  # A random model writes no answer tags: the console line says how many windows fell back, as the report does.
  parsers = report["totals"]["parsers"]
  fell = sum(v for k, v in parsers.items() if k != "answer_tag")
  summary = [line for line in proc.stderr.splitlines() if line.startswith("rrjax.rerank: 2 queries")]
  assert fell > 0 and len(summary) == 1 and f"parser: {fell} of 18 windows fell back" in summary[0], proc.stderr


def test_fallback_note_counts_what_the_parser_could_not_read():
  assert rr.report.fallback_note({"parsers": {"answer_tag": 9}}) is None
  note = rr.report.fallback_note({"parsers": {"answer_tag": 5, "whole_text": 3, "unparsable": 1}})
  assert note == "4 of 9 windows fell back: 3 read from the whole text, 1 unparsable (left in first-stage order)"
  assert rr.report.fallback_note({"sources": {"think_end": 6, "cut": 2}}) == \
      "2 of 8 passages fell back: 2 cut before </think>"


def test_help_shows_every_default():
  defaults = rr.RerankSettings()
  group = next(g for g in rr.build_parser()._action_groups if g.title.startswith("settings"))
  for action in group._group_actions:
    field = action.dest
    assert action.help and "default" in action.help, field
    value = getattr(defaults, field)
    if value is not None and not isinstance(value, bool):
      assert str(value) in action.help, (field, action.help)
  assert {a.dest for a in group._group_actions} == set(rr.settings.FIELDS)  # every setting has its flag


def test_cli_default_concurrency_stays_within_its_memory_budget(tiny_dir, dl19, tmp_path):
  """The documented command (bundled DL19, top-100, windows 20/10, 100-token passages, default concurrency)
  with a small new-token budget: the engine chooses its slots and prefill groups from the budget (the
  host's available memory on CPU), and the process's peak RSS stays below that budget."""
  out = tmp_path / "dl19.trec"
  cmd = [sys.executable, "-m", "rrjax.rerank", "--model", tiny_dir, "--corpus", dl19["rankgpt"],
         "--max-passage-tokens", "100", "--max-new-tokens", "4", "--max-queries", "2", "--out", str(out),
         "--no-progress"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine has
  with open(tmp_path / "stderr", "w") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr").read_text()[-3000:]
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["totals"]["windows"] == 2 * 9
  engine = report["engine"]
  assert engine["slots"] >= 2 and engine["prefill_group"] >= 1 and engine["prefill_calls"] >= 9
  assert engine["estimate_bytes"] <= engine["budget_bytes"]
  devices = math.prod(report["mesh"].values())  # the budget is per device; they share the host
  assert devices == 1 and usage.ru_maxrss * 1024 < engine["budget_bytes"] * devices, (usage.ru_maxrss, engine)


@pytest.mark.parametrize("mode", ["pointwise", "full"])
def test_cli_other_modes(mode, tiny_dir, dl19, tmp_path):
  out = tmp_path / f"{mode}.trec"
  assert rr.main(["--model", tiny_dir, "--corpus", dl19["rankgpt"], "--qrels", dl19["qrels"], "--out", str(out),
                  "--mode", mode, "--max-queries", "1", "--max-new-tokens", "3", "--max-passage-tokens", "12",
                  "--no-progress"]) == 0
  first = trec.read_run(dl19["run"])
  qid = next(iter(first))
  run = _check_run(out, {qid: first[qid]})
  # The slots keep the first stage's scores: only the documents move.
  assert sorted(run[qid].values(), reverse=True) == sorted(first[qid].values(), reverse=True)
  report = json.loads(out.with_suffix(".json").read_text())
  entry = report["queries"][qid]
  if mode == "pointwise":
    assert entry["documents"] == 100 and sum(entry["sources"].values()) == 100
    assert set(entry["sources"]) <= set(pointwise.POINTWISE_SOURCES)
    scores = entry["scores"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    order = [d for d, _ in trec.ranked(run[qid])]
    assert [scores[d] for d in order] == sorted(scores.values(), reverse=True)
  else:
    assert [(w["start"], w["end"]) for w in entry["windows"]] == [(0, 100)]


def test_rank1_score_is_label_softmax_after_think(tok):
  """The score is p(true) / (p(true) + p(false)) at the position after prompt + reasoning + `</think>`."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import rrjax
  from rrjax.model.qwen2 import Qwen2, Qwen2Config
  from rrjax.ranking import rank1_label_ids, rank1_prompt

  model = Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(1))
  backend = ModelBackend(model, tok, rr.RerankSettings(mode="pointwise", max_new_tokens=6))
  prompts = [rank1_prompt("how long is the life cycle of a flea", "A flea lives up to a year."),
             rank1_prompt("q", "Passage two. It is short")]
  got = backend.score(prompts)
  true_id, false_id = rank1_label_ids(tok)
  ids = tok.encode_batch(prompts)
  gen = rrjax.generate(model, ids, max_new_tokens=6, stop_ids=tok.stop_ids)  # the scorer's compiled call
  for i, score in enumerate(got):
    text, source = pointwise.rank1_reasoning(tok.decode(gen.tokens[i], skip_special_tokens=True))
    logits_V = np.asarray(model(jnp.asarray([ids[i] + tok.encode(text)])))[0, -1].astype(np.float64)
    want = 1 / (1 + np.exp(logits_V[false_id] - logits_V[true_id]))
    assert score.score == pytest.approx(want, abs=1e-4)
    assert (score.source, score.generated_tokens, score.prompt_tokens) == (source, gen.lengths[i], len(ids[i]))


# ---------------------------------------------------------------- the loop, scripted completions


def test_identity_keeps_bm25(inputs, dl19, tok):
  from rrjax.eval import evaluate

  calls = []

  def complete(prompts):
    calls.append(len(prompts))
    return [_answer(range(p.end - p.start)) for p in prompts]

  ranked = loop.rerank_listwise(inputs.queries, complete, tok, max_passage_tokens=100)
  assert calls == [43] * 9  # lockstep: every query's k-th window in one call
  run = loop.to_run(ranked)
  assert run == trec.read_run(dl19["run"])
  ndcg = evaluate(dl19["qrels"], run, ["ndcg@10"])["mean"]["ndcg@10"]
  assert round(ndcg, 4) == 0.5058
  assert {w.parser for r in ranked for w in r.windows} == {"answer_tag"}


def _upstream_windows(docids, rel, window=20, stride=10, rank_end=100):
  """Upstream's sliding_windows loop with reranker.py's clamping, written out again, ordering each window
  by the qrels (stable)."""
  docids = list(docids)[:rank_end]
  rank_end = min(rank_end, len(docids))
  window = min(window, len(docids))
  end, start = rank_end, rank_end - window
  while end > 0 and start + stride != 0:
    start = max(start, 0)
    part = docids[start:end]
    docids[start:end] = sorted(part, key=lambda d: -rel.get(d, 0))
    end, start = end - stride, start - stride
  return docids


def test_oracle_matches_independent_window_process(inputs, dl19, tok):
  qrels = trec.read_qrels(dl19["qrels"])
  # Three queries with fewer candidates than top-k ride in the same batch.
  queries = list(inputs.queries[:6])
  for i, n in ((1, 35), (3, 7), (4, 1)):
    queries[i] = dataclasses.replace(queries[i], candidates=queries[i].candidates[:n])
  calls = []

  def oracle(prompts):
    calls.append([(p.qid, p.start, p.end) for p in prompts])
    rel = qrels
    out = []
    for p in prompts:
      assert len(p.docids) == p.end - p.start and f"[{len(p.docids)}]" in p
      order = sorted(range(len(p.docids)), key=lambda j: (-rel[p.qid].get(p.docids[j], 0), j))
      out.append(_answer(order))
    return out

  ranked = loop.rerank_listwise(queries, oracle, tok, max_passage_tokens=100)
  for q, r in zip(queries, ranked):
    expected = _upstream_windows([c.docid for c in q.candidates], qrels[q.qid])
    assert [c.docid for c in r.candidates] == expected
    assert [c.score for c in r.candidates] == [c.score for c in q.candidates]  # slot scores stay
  assert len(calls) == 9
  assert [len(c) for c in calls] == [6, 4, 4, 3, 3, 3, 3, 3, 3]  # 35 -> 3 windows, 7 and 1 -> 1 window
  assert calls[0][1] == (queries[1].qid, 15, 35) and calls[0][3] == (queries[3].qid, 0, 7)
  assert all(len({qid for qid, _, _ in c}) == len(c) for c in calls)
  assert [w.start for w in ranked[1].windows] == [15, 5, 0]
  # The oracle puts the judged-relevant documents on top wherever the windows let them travel.
  from rrjax.eval import evaluate

  before = evaluate(qrels, {q.qid: {c.docid: c.score for c in q.candidates} for q in queries}, ["ndcg@10"])
  after = evaluate(qrels, loop.to_run(ranked), ["ndcg@10"])
  assert after["mean"]["ndcg@10"] > before["mean"]["ndcg@10"]


def _truncated(inputs):
  queries = list(inputs.queries[:6])
  for i, n in ((1, 35), (3, 7), (4, 1)):  # fewer candidates than top-k, than a window, and a single one
    queries[i] = dataclasses.replace(queries[i], candidates=queries[i].candidates[:n])
  return queries


def test_async_schedule_matches_lockstep_and_upstream_windows(inputs, dl19, tok):
  qrels = trec.read_qrels(dl19["qrels"])
  queries = _truncated(inputs)

  def oracle(prompts):
    return [_answer(sorted(range(len(p.docids)), key=lambda j: (-qrels[p.qid].get(p.docids[j], 0), j)))
            for p in prompts]

  lockstep = loop.rerank_listwise(queries, oracle, tok, max_passage_tokens=100)
  completer = loop.BatchCompleter(oracle)
  seen = []
  ranked = loop.rerank_listwise_async(queries, completer, tok, max_passage_tokens=100, progress=seen.append)
  assert ranked == lockstep and len(seen) == sum(len(r.windows) for r in ranked) == 9 * 3 + 3 + 1 + 1
  for q, r in zip(queries, ranked):
    assert [c.docid for c in r.candidates] == _upstream_windows([c.docid for c in q.candidates], qrels[q.qid])


def test_async_schedule_runs_continuing_queries_first(inputs, tok):
  """One slot: a query's next window goes before the queries not started yet, those with most windows first."""
  queries = _truncated(inputs)

  class OneSlot:
    def __init__(self):
      self.queue, self.order = [], []

    def submit(self, prompt, priority):
      self.queue.append((priority, len(self.order) + len(self.queue), prompt))

    def poll(self):
      self.queue.sort(key=lambda e: (e[0], e[1]))
      _, _, prompt = self.queue.pop(0)
      self.order.append((prompt.qid, prompt.start))
      return [(prompt, _answer(range(prompt.end - prompt.start)))]

  slot = OneSlot()
  loop.rerank_listwise_async(queries, slot, tok, max_passage_tokens=20)
  by_query = [q.qid for q in queries]
  visited = list(dict.fromkeys(qid for qid, _ in slot.order))
  assert visited == [by_query[i] for i in (0, 2, 5, 1, 3, 4)]  # 9, 9, 9, then 3, 1, 1 windows; ties in order
  firsts = [i for i, (qid, _) in enumerate(slot.order) if i == 0 or slot.order[i - 1][0] != qid]
  assert len(firsts) == len(queries)  # each query runs to its end once started: no interleaving


def test_empty_share_reranks_nothing(tok):
  out = rr.rerank([], None, tok, rr.RerankSettings())  # nothing to decode: no model, no engine
  report = rr.build_report(rr.RerankSettings(), out)
  assert out.ranked == [] and report["totals"]["queries"] == report["totals"]["windows"] == 0


def test_default_mesh_replicates_small_models_and_splits_large_ones():
  from rrjax.engine import memory
  from rrjax.model.qwen2 import Qwen2Config
  from rrjax.sharding import MeshConfig

  devices = list(range(8))
  gb = 10**9
  assert memory.inference_mesh(Qwen2Config.tiny(), devices, "float32", 16 * gb) == MeshConfig(8, 1, 1)
  # 7B in bf16 (15 GB) on 16 GB TPU v5e chips: tensor parallelism over 2 (4 kv heads), 4 replicas.
  assert memory.inference_mesh(Qwen2Config.qwen2_5_7b(), devices, "bfloat16", 16 * gb) == MeshConfig(4, 1, 2)
  # 32B (65 GB) on 80 GB GPUs: 2 devices hold it beside a cache.
  assert memory.inference_mesh(Qwen2Config.qwen2_5_32b(), devices, "bfloat16", 80 * gb) == MeshConfig(4, 1, 2)


def test_engine_schedules_agree_on_short_and_single_candidate_queries(inputs, tiny_dir, tok):
  """On the model: a full query, one with fewer candidates than a window and one with a single candidate."""
  from rrjax.checkpoints import from_pretrained

  model = from_pretrained(tiny_dir)
  queries = [inputs.queries[0], dataclasses.replace(inputs.queries[1], candidates=inputs.queries[1].candidates[:7]),
             dataclasses.replace(inputs.queries[2], candidates=inputs.queries[2].candidates[:1])]
  base = rr.RerankSettings(top_k=30, window=10, stride=5, max_passage_tokens=30, max_new_tokens=6)
  out = {s: rr.rerank(queries, model, tok, dataclasses.replace(base, schedule=s)) for s in loop.SCHEDULES}
  assert out["async"].ranked == out["lockstep"].ranked
  assert [len(r.windows) for r in out["async"].ranked] == [5, 1, 1]
  assert [len(r.candidates) for r in out["async"].ranked] == [30, 7, 1]


def test_a_window_that_cannot_fit_at_one_slot_is_one_line_and_exit_2(tiny_dir, dl19, tmp_path):
  out = tmp_path / "r.trec"
  cmd = [sys.executable, "-m", "rrjax.rerank", "--model", tiny_dir, "--corpus", dl19["rankgpt"], "--out", str(out),
         "--max-queries", "1", "--max-new-tokens", "2000000000", "--no-progress"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("rrjax.rerank: error: window ")
  assert re.search(r"does not fit even at (1 slot|\d+ slots \(one per data shard\)):", lines[0])
  assert "2000000000 new" in lines[0] and not out.exists() and not out.with_suffix(".json").exists()


def _small_cli(tiny_dir, dl19, out, *extra):
  return rr.main(["--model", tiny_dir, "--corpus", dl19["rankgpt"], "--out", str(out), "--max-queries", "4",
                  "--window", "10", "--stride", "5", "--top-k", "30", "--max-passage-tokens", "50",
                  "--max-new-tokens", "8", "--no-progress", *extra])


def test_cli_async_and_lockstep_write_the_same_run(tiny_dir, dl19, tmp_path):
  """Greedy: every window depends only on its own query's previous window, so the schedules agree byte for
  byte (windows 10/5 over top-30, prompts of mixed lengths)."""
  runs = {}
  for schedule in ("async", "lockstep"):
    out = tmp_path / f"{schedule}.trec"
    assert _small_cli(tiny_dir, dl19, out, "--schedule", schedule) == 0
    runs[schedule] = out.read_bytes()
    totals = json.loads(out.with_suffix(".json").read_text())["totals"]
    assert totals["schedule"] == schedule and totals["windows"] == 4 * 5
    assert 0 < totals["occupancy"] <= 1 and totals["windows_per_second"] > 0 and totals["prefill_seconds"] > 0
    prompts = [w["prompt_tokens"] for q in json.loads(out.with_suffix(".json").read_text())["queries"].values()
               for w in q["windows"]]
  assert runs["async"] == runs["lockstep"] and len(set(prompts)) > 10


def test_cli_mesh_shapes_give_the_same_run(tiny_dir, dl19, tmp_path):
  runs = {}
  for mesh in ("1,1,1", "2,2,2", "1,4,2"):
    out = tmp_path / f"mesh{mesh.replace(',', '')}.trec"
    assert _small_cli(tiny_dir, dl19, out, "--mesh", mesh, "--max-queries", "1", "--top-k", "20",
                      "--max-passage-tokens", "30") == 0
    runs[mesh] = out.read_bytes()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["mesh"] == dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split(","))))
  assert runs["2,2,2"] == runs["1,1,1"] == runs["1,4,2"]
  with pytest.raises(SystemExit):
    rr.build_parser().parse_args(["--model", "m", "--corpus", "c", "--out", "o", "--mesh", "2,2"])


def test_pointwise_loop_sorts_by_score_and_keeps_slots(inputs, tok):
  queries = inputs.queries[:2]
  seen = []

  def score(prompts):
    seen.extend(prompts)
    # Ties (every third prompt scores 0.5) keep first-stage order.
    return [loop.PointwiseScore(0.5 if i % 3 == 0 else (hash(p) % 1000) / 1000, 1, 1) for i, p in enumerate(prompts)]

  ranked = loop.rerank_pointwise(queries, score, tok, top_k=30, max_passage_tokens=20, chunk_size=7)
  assert len(seen) == 60 and all(p.startswith("Determine if the following passage") for p in seen)
  assert all(p.endswith("\n<think>") for p in seen)
  for q, r in zip(queries, ranked):
    first = list(q.candidates[:30])
    pos = {c.docid: j for j, c in enumerate(first)}
    keys = [(-r.pointwise[c.docid].score, pos[c.docid]) for c in r.candidates]
    assert keys == sorted(keys)
    assert [c.score for c in r.candidates] == [c.score for c in first]


def test_rank1_reasoning_cut():
  assert pointwise.rank1_reasoning("it is about fleas.</think> true") == ("it is about fleas.</think>", "think_end")
  assert pointwise.rank1_reasoning("First. Second! Third is cut") == ("First. Second!\n</think>", "cut")
  assert pointwise.rank1_reasoning("no sentence end") == ("\n</think>", "cut")
  assert pointwise.rank1_reasoning("version 2.5 is out. and") == ("version 2.5 is out.\n</think>", "cut")


def test_count_windows():
  assert loop.count_windows([100, 35, 7, 0]) == 9 + 3 + 1
  assert loop.count_windows([100, 35, 0], full_list=True) == 2
  assert loop.count_windows([250], top_k=100) == 9


# ---------------------------------------------------------------- settings


def test_gin_then_flags(tmp_path):
  args = rr.build_parser().parse_args(["--model", "m", "--corpus", "c", "--out", "o.trec", "--gin_file",
                                       os.path.join(ROOT, "configs", "rerank", "beir_dl.gin"),
                                       "--gin_param", "RerankSettings.stride = 5", "--window", "10"])
  s = rr.resolve_settings(args)
  assert (s.max_passage_tokens, s.stride, s.window, s.max_new_tokens, s.top_k) == (100, 5, 10, 3172, 100)
  assert rr.settings_from_gin(["bright.gin"]).max_passage_tokens == 512
  assert rr.settings_from_gin(["rank1.gin"]).mode == "pointwise"
  assert rr.RerankSettings() == rr.settings_from_gin(["reasonrank.gin"])
  with pytest.raises(ValueError, match="unknown RerankSettings field.*windw"):
    rr.settings_from_gin([], ["RerankSettings.windw = 3"])
  with pytest.raises(ValueError, match="stride"):
    rr.settings_from_gin([], ["RerankSettings.stride = 0"])
  with pytest.raises(ValueError, match="nope.gin"):
    rr.settings_from_gin(["nope.gin"])
  from rrjax.sharding import MeshConfig
  meshed = rr.settings_from_gin([], ["RerankSettings.mesh = @MeshConfig()", "MeshConfig.data = 4",
                                     "MeshConfig.tensor = 2", "RerankSettings.schedule = 'lockstep'"])
  assert meshed.mesh == MeshConfig(data=4, fsdp=1, tensor=2) and meshed.schedule == "lockstep"
  with pytest.raises(ValueError, match="schedule"):
    rr.settings_from_gin([], ["RerankSettings.schedule = 'rounds'"])
  assert rr.report_path("x/run.trec") == rr.report_path("x/run.trec.gz")
  with pytest.raises(ValueError):
    rr.report_path("run.json")


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small_inputs(tmp_path):
  (tmp_path / "topics.tsv").write_text("q1\tfirst query\nq2\tsecond query\n")
  (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"docid": d, "text": f"passage {d}"}) + "\n"
                                                 for d in ("d1", "d2", "d3")))
  return tmp_path


def test_load_inputs_jsonl_corpus_and_tsv_topics(small_inputs):
  (small_inputs / "run.trec").write_text("q2 Q0 d3 1 1.0 x\nq1 Q0 d1 2 2.0 x\nq1 Q0 d2 1 3.0 x\nq1 Q0 d3 3 2.0 x\n")
  got = load_inputs(small_inputs / "corpus.jsonl", small_inputs / "run.trec", small_inputs / "topics.tsv", top_k=2)
  assert [q.qid for q in got.queries] == ["q2", "q1"]
  q1 = got.queries[1]
  assert q1.text == "first query"
  assert [(c.docid, c.score) for c in q1.candidates] == [("d2", 3.0), ("d3", 2.0)]  # trec_eval order, top 2
  assert q1.candidates[0].doc == {"text": "passage d2"}
  assert got.first_stage == {"q2": {"d3": 1.0}, "q1": {"d2": 3.0, "d3": 2.0}}
  with pytest.raises(ValueError, match="--queries is required"):
    load_inputs(small_inputs / "corpus.jsonl", small_inputs / "run.trec")


@pytest.mark.parametrize("case", ["missing_doc", "missing_query", "malformed", "bad_model"])
def test_bad_input_one_line_no_output(case, small_inputs, tiny_dir, tmp_path):
  run_lines = ["q1 Q0 d1 1 3.0 bm25", "q1 Q0 d2 2 2.0 bm25", "q2 Q0 d3 1 1.0 bm25"]
  model = tiny_dir
  expect = []
  if case == "missing_doc":
    run_lines[2] = "q2 Q0 d9 1 1.0 bm25"
    expect = ["run.trec:3", "'d9'", "corpus.jsonl"]
  elif case == "missing_query":
    run_lines[1:] = ["q1 Q0 d2 2 2.0 bm25", "q7 Q0 d3 1 1.0 bm25"]
    expect = ["run.trec:3", "'q7'", "topics.tsv"]
  elif case == "malformed":
    run_lines[1] = "q1 Q0 d2 2 2.0"
    expect = ["run.trec:2", "6 fields"]
  else:
    model = str(tmp_path / "empty_model")
    os.mkdir(model)
    expect = ["empty_model"]
  (small_inputs / "run.trec").write_text("\n".join(run_lines) + "\n")
  outdir = tmp_path / "out"
  outdir.mkdir()
  cmd = [sys.executable, "-m", "rrjax.rerank", "--model", model, "--run", str(small_inputs / "run.trec"),
         "--queries", str(small_inputs / "topics.tsv"), "--corpus", str(small_inputs / "corpus.jsonl"),
         "--out", str(outdir / "r.trec"), "--max-new-tokens", "2", "--no-progress"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("rrjax.rerank: error: ")
  for s in expect:
    assert s in lines[0]
  assert list(outdir.iterdir()) == []
