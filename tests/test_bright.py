"""`python -m rrjax.bright`: the paper's first-stage row from the bundled runs and qrels, and the whole table on
a BRIGHT-layout snapshot written here (two tasks, a few queries, synthetic documents) with a tiny random model,
resumed task by task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bright_fixtures import bright_for_bundled_run
from rrjax import bright
from rrjax.data import benchmarks

REFERENCE = Path(__file__).parent / "data" / "trec" / "reference-metrics.json"


def _row(markdown: str, label: str) -> list[str]:
  line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
  return [c.strip() for c in line.strip("|").split("|")][1:]


def test_first_stage_only_prints_the_papers_row(tmp_path, capsys):
  expected = json.loads(REFERENCE.read_text())["bright_reasonir_gpt4cot_top100_first_stage"]["per_task"]
  assert bright.main(["--first-stage-only", "--out", str(tmp_path)]) == 0
  out, err = capsys.readouterr()
  header = _row(out.replace("|  |", "| header |", 1), "header")
  assert header == [*benchmarks.BRIGHT_TASKS.values(), "Avg."]
  cells = _row(out, bright.FIRST_STAGE)
  want = [f"{expected[t.replace('_', '-')]['NDCG@10']:.2f}" for t in benchmarks.BRIGHT_TASKS]
  assert cells == want + ["30.59"]  # ReasonRank's Table 1, ReasonIR row
  assert "stackoverflow: skipped 12 first-stage run lines" in err
  saved = json.loads((tmp_path / "bright_table.json").read_text())
  assert round(100 * saved["average"][bright.FIRST_STAGE], 2) == 30.59
  assert saved["first_stage"]["stackoverflow"]["run_lines_skipped"] == 12
  assert all(saved["first_stage"][t]["num_queries"] == expected[t.replace("_", "-")]["num_queries"]
             for t in benchmarks.BRIGHT_TASKS)
  assert (tmp_path / "bright_table.md").read_text().strip() == out.strip()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  from flax import nnx

  import rrjax
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  path = tmp_path_factory.mktemp("model") / "tiny"
  rrjax.save_pretrained(Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(0)), path)
  return str(path)


def test_whole_table_on_a_snapshot_resumes_per_task(tmp_path, tiny_model, capsys, monkeypatch):
  snap = tmp_path / "BRIGHT"
  for task in ("pony", "economics"):
    bright_for_bundled_run(snap, task, num_queries=2, top_k=4)
  out = tmp_path / "out"
  argv = ["--model", tiny_model, "--data_dir", str(snap), "--tasks", "economics,pony", "--out", str(out),
          "--gin_param", "RerankSettings.top_k = 4", "--gin_param", "RerankSettings.window = 4",
          "--gin_param", "RerankSettings.stride = 2", "--gin_param", "RerankSettings.max_queries = 2",
          "--mode", "listwise", "--max-new-tokens", "4", "--max-passage-tokens", "16", "--no-progress"]
  assert bright.main(argv) == 0
  text, err = capsys.readouterr()
  assert err.count(": reranking") == 2
  label = "rrjax reranker (tiny)"
  assert _row(text.replace("|  |", "| header |", 1), "header") == ["Econ.", "Pony", "Avg."]
  table = json.loads((out / "bright_table.json").read_text())
  assert table["tasks"] == ["economics", "pony"] and set(table["rows"]) == {bright.FIRST_STAGE, label}
  for task in ("economics", "pony"):
    report = json.loads((out / f"{task}.json").read_text())
    assert report["inputs"]["dataset"] == f"bright:{task}" and report["metrics"]["num_queries"] == 2
    assert report["settings"]["max_passage_tokens"] == 16 and report["settings"]["window"] == 4
    assert report["totals"]["windows"] == 2 * 1  # top 4, window 4: one window per query
    assert table["rows"][label][task] == report["metrics"]["reranked"]["ndcg@10"]
    assert _row(text, label)[["economics", "pony"].index(task)] == f"{100 * table['rows'][label][task]:.2f}"
  stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.trec")}

  # Everything done: nothing is reranked and no model is loaded.
  monkeypatch.setattr("rrjax.checkpoints.from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
  assert bright.main(argv) == 0
  text2, err = capsys.readouterr()
  assert err.count("done before") == 2 and "reranking" not in err and text2 == text
  monkeypatch.undo()
  # One task's outputs gone: only that task is redone.
  (out / "pony.json").unlink()
  assert bright.main(argv) == 0
  _, err = capsys.readouterr()
  assert "economics: done before" in err and "pony: reranking" in err
  assert (out / "economics.trec").stat().st_mtime_ns == stamps["economics.trec"]
  # Other settings for the same --out are refused rather than mixed into one table.
  with pytest.raises(ValueError, match=r"economics\.json: this was reranked with other settings"):
    bright.main([a if a != "16" else "24" for a in argv])


def test_qwen3_checkpoint_takes_the_8b_prompt_and_sampling_unless_told(tmp_path, capsys):
  """A Qwen3 directory (model_type qwen3, its bundled Qwen3 tokenizer exported beside it) runs with ReasonRank-8B's
  rank_GPT_qwen3 prompt and vLLM sampling (configs/rerank/reasonrank_8b.gin); the user's flags still win."""
  from flax import nnx

  import rrjax
  from rrjax.model.qwen2 import Qwen2, Qwen2Config
  from rrjax.rerank import cli as rerank_cli

  model = str(tmp_path / "qwen3")
  rrjax.save_pretrained(Qwen2(Qwen2Config.tiny(qk_norm=True, attention_bias=False), rngs=nnx.Rngs(0)), model)
  snap = tmp_path / "BRIGHT"
  bright_for_bundled_run(snap, "pony", num_queries=1, top_k=4)
  out = tmp_path / "out"
  argv = ["--model", model, "--data_dir", str(snap), "--tasks", "pony", "--out", str(out),
          "--gin_param", "RerankSettings.top_k = 4", "--gin_param", "RerankSettings.window = 4",
          "--gin_param", "RerankSettings.max_queries = 1", "--max-new-tokens", "6", "--max-passage-tokens", "16",
          "--no-progress"]
  assert bright.main(argv) == 0
  capsys.readouterr()
  settings = json.loads((out / "pony.json").read_text())["settings"]
  assert (settings["prompt_mode"], settings["temperature"], settings["top_p"], settings["sampling_top_k"],
          settings["min_p"], settings["max_passage_tokens"]) == ("qwen3", 0.6, 0.95, 20, 0.0, 16)
  args, passthrough = bright.build_parser().parse_known_args(argv + ["--prompt-mode", "rank_GPT_reasoning",
                                                                     "--temperature", "0"])
  told = rerank_cli.resolve_settings(rerank_cli.build_parser().parse_args(
      bright._rerank_argv(args, "pony", out, passthrough)))
  assert (told.prompt_mode, told.temperature, told.sampling_top_k) == ("reasoning", 0.0, 20)
  assert bright.family_gin_files(str(tmp_path / "qwen3")) == ["reasonrank_8b.gin"]
