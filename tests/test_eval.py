"""rrjax.eval against pytrec_eval (trec_eval semantics) on real runs, plus the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval

from rrjax import eval as rreval
from rrjax.data import trec

TREC = Path(__file__).parent / "data" / "trec"
DL19 = TREC / "dl19"
BRIGHT = TREC / "bright"
REPO = Path(__file__).resolve().parents[1]
RUNS = ("BM25", "BM25_RM3", "SPLADE_P_P_ENSEMBLE_DISTIL")
BRIGHT_TASKS = ("aops", "biology", "earth-science", "economics", "leetcode", "pony", "psychology",
                "robotics", "stackoverflow", "sustainable-living", "theoremqa-questions",
                "theoremqa-theorems")
# ours -> pytrec_eval's names
PAIRS = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "mrr": "recip_rank",
         "map@100": "map_cut_100", "ndcg": "ndcg", "p@10": "P_10"}


@pytest.fixture(scope="module")
def reference():
  return json.loads((TREC / "reference-metrics.json").read_text())


@pytest.fixture(scope="module")
def dl19_qrels():
  return trec.read_qrels(DL19 / "qrels.dl19-passage.txt.gz")


def _compare(qrels, run, relevance_level):
  ours = rreval.evaluate(qrels, run, list(PAIRS), relevance_level=relevance_level)
  measures = {"ndcg_cut.10", "recall.100", "recip_rank", "map_cut.100", "ndcg", "P.10"}
  ref = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level).evaluate(run)
  assert set(ours["per_query"]) == set(ref)
  for qid, vals in ref.items():
    for mine, theirs in PAIRS.items():
      assert ours["per_query"][qid][mine] == pytest.approx(vals[theirs], abs=1e-6), (qid, mine)
  for mine, theirs in PAIRS.items():
    mean = sum(v[theirs] for v in ref.values()) / len(ref)
    assert ours["mean"][mine] == pytest.approx(mean, abs=1e-6), mine
  return ours


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("level", [1, 2])
def test_dl19_matches_pytrec_eval(dl19_qrels, reference, name, level):
  run = trec.read_run(DL19 / f"{name}.dl19.top100.trec.gz")
  ours = _compare(dl19_qrels, run, level)
  assert len(ours["per_query"]) == 43
  published = reference["first_stage_top100_runs"]["values"][f"{name}.dl19"]
  assert round(ours["mean"]["ndcg@10"], 4) == published["ndcg_cut_10"]
  if level == 1:
    assert round(ours["mean"]["recall@100"], 4) == published["recall_100"]
    assert round(ours["mean"]["mrr"], 4) == published["recip_rank"]
  else:
    assert round(ours["mean"]["map@100"], 4) == published["map_cut_100(-l 2)"]
    assert round(ours["mean"]["recall@100"], 4) == published["recall_100(-l 2)"]


@pytest.mark.parametrize("level", [1, 2])
def test_mrr_at_10_is_recip_rank_of_the_top_10(dl19_qrels, level):
  run = trec.read_run(DL19 / "BM25.dl19.top100.trec.gz")
  top10 = {q: dict(trec.ranked(docs)[:10]) for q, docs in run.items()}
  ref = pytrec_eval.RelevanceEvaluator(dl19_qrels, {"recip_rank"}, relevance_level=level).evaluate(top10)
  ours = rreval.evaluate(dl19_qrels, run, ["mrr@10"], relevance_level=level)
  for qid, vals in ref.items():
    assert ours["per_query"][qid]["mrr@10"] == pytest.approx(vals["recip_rank"], abs=1e-6)
  uncut = rreval.evaluate(dl19_qrels, run, ["mrr"], relevance_level=level)["per_query"]
  assert any(uncut[q]["mrr"] != ours["per_query"][q]["mrr@10"] for q in ref)  # the cut matters here


def test_bm25_dl19_published_anchor(dl19_qrels):
  result = rreval.evaluate(dl19_qrels, DL19 / "BM25.dl19.top100.trec.gz", ["ndcg@10", "ndcg_cut_10"])
  assert f"{result['mean']['ndcg@10']:.4f}" == "0.5058"
  assert result["mean"]["ndcg_cut_10"] == result["mean"]["ndcg@10"]


def test_bright_reasonir_all_tasks(reference):
  expected = reference["bright_reasonir_gpt4cot_top100_first_stage"]["per_task"]
  metrics = ["ndcg@1", "ndcg@5", "ndcg@10"]
  means = []
  for task in BRIGHT_TASKS:
    qrels = trec.read_qrels(BRIGHT / f"qrels.bright-{task}.txt.gz")
    run = trec.read_run(BRIGHT / f"{task}.reasonir_gpt4cot_top20.txt.gz", skip_malformed=True)
    assert run.skipped == expected[task]["run_lines_skipped_docid_with_space"]
    ours = rreval.evaluate(qrels, run, metrics)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,5,10"}).evaluate(run)
    assert len(ours["per_query"]) == len(ref) == expected[task]["num_queries"]
    for qid, vals in ref.items():
      for k in (1, 5, 10):
        assert ours["per_query"][qid][f"ndcg@{k}"] == pytest.approx(vals[f"ndcg_cut_{k}"], abs=1e-6)
    for k in (1, 5, 10):
      assert round(ours["mean"][f"ndcg@{k}"] * 100, 2) == expected[task][f"NDCG@{k}"], (task, k)
    means.append(ours["mean"]["ndcg@10"])
  assert round(sum(means) / len(means) * 100, 2) == 30.59


def test_ties_docid_descending_and_query_sets():
  qrels = {"q1": {"a": 1, "b": 0, "z": 2}, "q2": {"x": 0}, "q3": {"m": 1}}
  run = {"q1": {"a": 1.0, "b": 1.0, "z": 1.0, "c": 2.0}, "q2": {"x": 3.0, "y": 3.0},
         "q4": {"m": 1.0}}  # q3 has no run, q4 has no qrels: both ignored
  ours = _compare(qrels, run, 1)
  assert set(ours["per_query"]) == {"q1", "q2"}
  assert ours["per_query"]["q2"]["ndcg@10"] == 0.0  # all-zero judgments count, scoring 0
  assert trec.ranked(run["q1"]) == [("c", 2.0), ("z", 1.0), ("b", 1.0), ("a", 1.0)]


def test_metric_names_and_errors():
  assert rreval.parse_metric("ndcg@10") == ("ndcg", 10)
  assert rreval.parse_metric("map_cut_100") == ("map", 100)
  assert rreval.parse_metric("recip_rank") == ("mrr", None)
  assert rreval.parse_metric("P_5") == ("p", 5)
  with pytest.raises(ValueError):
    rreval.parse_metric("bleu@4")
  with pytest.raises(ValueError):
    rreval.evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, ["ndcg@10"], relevance_level=0)
  empty = rreval.evaluate({"q": {"d": 1}}, {"other": {"d": 1.0}}, "ndcg@10")
  assert empty == {"mean": {"ndcg@10": 0.0}, "per_query": {}}


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "rrjax.eval", *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=120)


def test_cli_table_json_and_bad_file(tmp_path):
  qrels, run = DL19 / "qrels.dl19-passage.txt.gz", DL19 / "BM25.dl19.top100.trec.gz"
  out = _cli("--qrels", qrels, "--run", run, "--metrics", "ndcg@10,map@100", "--relevance-level", "2",
             "--json")
  assert out.returncode == 0, out.stderr
  data = json.loads(out.stdout)
  assert round(data["mean"]["ndcg@10"], 4) == 0.5058
  assert round(data["mean"]["map@100"], 4) == 0.2476
  assert data["num_queries"] == 43

  bad = tmp_path / "bad.run"
  bad.write_text("1 Q0 d1 1 2.0 tag\n1 Q0 d2 2 notascore tag\n")
  out = _cli("--qrels", qrels, "--run", bad)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and f"{bad}:2" in lines[0] and "Traceback" not in out.stderr


def test_cli_prints_table():
  out = _cli("--qrels", DL19 / "qrels.dl19-passage.txt.gz", "--run", DL19 / "BM25.dl19.top100.trec.gz",
             "--per-query")
  assert out.returncode == 0, out.stderr
  assert any(line.split()[:3] == ["ndcg@10", "all", "0.5058"] for line in out.stdout.splitlines())
  assert any(line.split()[:3] == ["num_q", "all", "43"] for line in out.stdout.splitlines())
  assert sum(line.startswith("ndcg@10") for line in out.stdout.splitlines()) == 44
