"""The README's main job (`python -m rrjax.demo`) on a shortened configs/demo.gin: synthesize, SFT, GRPO,
sliding-window rerank of held-out queries, HF export and plots, with a held-out gain over the first stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrjax import demo

ROOT = Path(__file__).resolve().parents[1]
# Shorter than configs/demo.gin (600 SFT and 20 GRPO steps over 100 held-out queries), long enough for the
# model to learn the comparisons; both stages, both reranks and the export still run.
SHORT = ["sft/TrainConfig.num_steps = 300", "grpo/TrainConfig.num_steps = 2", "TaskConfig.num_test = 40",
         "TaskConfig.num_train = 2400"]


def test_demo_config_parses_and_rejects_typos():
  config, text = demo.parse_config([demo.DEFAULT_GIN], [])
  assert config.sft.trainer == "sft" and config.grpo.trainer == "grpo"
  assert config.task.test_passages_per_query > config.rerank["window"]  # held-out needs the sliding window
  assert config.sft.model.num_layers == config.grpo.model.num_layers and "sft/TrainConfig" in text
  with pytest.raises(ValueError, match="num_stepz"):
    demo.parse_config([demo.DEFAULT_GIN], ["sft/TrainConfig.num_stepz = 3"])


@pytest.mark.slow
def test_demo_end_to_end_beats_the_first_stage(tmp_path):
  out = tmp_path / "demo"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the README runs it
  cmd = [sys.executable, "-m", "rrjax.demo", "--out", str(out)] + [a for p in SHORT for a in ("--gin_param", p)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  ndcg = summary["heldout_ndcg10"]
  assert ndcg["first_stage"] < 0.3, ndcg  # the lexical first stage is misled on this task
  assert ndcg["sft"] > ndcg["first_stage"] + 0.2, ndcg
  assert ndcg["grpo"] > ndcg["first_stage"] + 0.2, ndcg
  assert summary["transformers_logits_agree"] is True and summary["transformers_max_abs_logit_diff"] < 1e-3
  assert (out / "grpo" / "hf" / "config.json").exists() and (out / "demo.png").stat().st_size > 10_000
  assert "after SFT + GRPO" in proc.stdout
  # Rerunning reuses every finished stage (training, both reranks, the export's check and plots) instead of
  # running it again; a different config is refused.
  outputs = [out / "rerank" / f"{s}.{x}" for s in ("sft", "grpo") for x in ("trec", "json")] + [out / "demo.png"]
  stamps = [p.stat().st_mtime_ns for p in outputs]
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  reused = [line for line in again.stdout.splitlines() if line.endswith("s)") and "(finished before: reused)" in line]
  assert len(reused) == 5 and "rrjax.train" not in again.stdout and "rrjax.rerank" not in again.stderr, again.stdout
  assert [p.stat().st_mtime_ns for p in outputs] == stamps
  rerun = json.loads((out / "summary.json").read_text())
  assert rerun["heldout_ndcg10"] == ndcg and all(rerun[k] == summary[k] for k in (
      "transformers_max_abs_logit_diff", "transformers_logits_agree"))
  assert all(rerun["seconds"][k] < 5 for k in ("sft", "rerank_sft", "grpo", "rerank_grpo", "export_and_plots"))
  other = subprocess.run(cmd + ["--gin_param", "TaskConfig.seed = 1"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert other.returncode != 0 and "different configuration" in other.stderr
