"""What a new user meets first: rrjax used from a plain Python script is quiet, and the README's how-tos run as
written (at reduced sizes)."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path, timeout=300, **env_extra):
  """Runs `code` as a user's script would: a fresh interpreter, no JAX_PLATFORMS, no simulated devices."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(code))
  return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_import_load_and_generate_print_nothing_and_tpu_compiles_still_work(tmp_path):
  proc = _python("""
      import importlib.util, sys
      import rrjax
      from flax import nnx
      from rrjax.model.qwen2 import Qwen2, Qwen2Config

      rrjax.save_pretrained(Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(0)), "tiny")
      model = rrjax.from_pretrained("tiny")
      out = rrjax.generate(model, [[1, 2, 3]], max_new_tokens=4)
      print("tokens", len(out.tokens[0]))
      sys.stdout.flush()
      print("=== topology", file=sys.stderr, flush=True)  # below: the TPU compiler, as preflight uses it
      if importlib.util.find_spec("libtpu") is not None:
        import jax, jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding
        from rrjax import preflight
        device = preflight.tpu_devices("v5e:2x2")[0]  # what preflight compiles for
        x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=SingleDeviceSharding(device))
        jax.jit(lambda a: a * 2).lower(x).compile()
        print("tpu compiled for", device.device_kind)
      """, tmp_path, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another process's libtpu lock would hide what it prints
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tokens 4" in proc.stdout
  before, _, _ = proc.stderr.partition("=== topology")
  assert before == "", before  # nothing from libtpu (or anyone) while importing, loading and generating
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    assert "tpu compiled for TPU v5" in proc.stdout, proc.stdout


def _readme_has(*words):
  """The README shows the command the test runs (the test adds only reduced-size flags)."""
  text = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
  for w in words:
    assert " ".join(w.split()) in text, w


def _run(args, cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_readme_howtos_synth_train_rerank_dl19_and_python(tmp_path):
  data = ROOT / "tests" / "data" / "trec"
  synth = ["rrjax.synth", "--out", "data/synth", "--num_train", "200", "--num_test", "10"]
  train = ["rrjax.train", "--gin_file", "sft/tiny_cpu.gin", "--gin_param",
           "SFTDataConfig.train_files = ('data/synth/train/sft.json',)"]
  rerank = ["rrjax.rerank", "--model", "runs/sft_tiny/hf", "--corpus", str(data / "BM25.dl19.top100.rankgpt.json.gz"),
            "--qrels", str(data / "dl19" / "qrels.dl19-passage.txt.gz"), "--out", "runs/dl19/reranked.trec",
            "--gin_file", "rerank/beir_dl.gin", "--max-queries", "2", "--top-k", "20", "--window", "10", "--stride", "5"]
  _readme_has("python -m " + " ".join(synth),
              "python -m rrjax.train --gin_file sft/tiny_cpu.gin --gin_param \"SFTDataConfig.train_files = "
              "('data/synth/train/sft.json',)\"",
              "--corpus tests/data/trec/BM25.dl19.top100.rankgpt.json.gz",
              "--gin_file rerank/beir_dl.gin --max-queries 2 --top-k 20 --window 10 --stride 5 --max-new-tokens 256")

  # Without data the recipe stops before anything is written.
  proc = _run(["rrjax.train", "--gin_file", "sft/tiny_cpu.gin"], tmp_path)
  assert proc.returncode == 2 and "no training files configured" in proc.stderr and not (tmp_path / "runs").exists()

  proc = _run(synth, tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = _run(train + ["--gin.TrainConfig.num_steps=2"], tmp_path)  # reduced: 2 of the recipe's 40 steps
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "runs" / "sft_tiny" / "hf" / "config.json").is_file()

  proc = _run(rerank + ["--max-new-tokens", "8", "--no-progress"], tmp_path)  # reduced: 8 new tokens
  assert proc.returncode == 0, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("rrjax.rerank: 2 queries") and "ndcg@10" in last and "(first stage" in last, last
  report = json.loads((tmp_path / "runs" / "dl19" / "reranked.json").read_text())
  assert report["totals"]["windows"] == 6 and report["settings"]["max_passage_tokens"] == 100

  # The README's Python entry, as written there (its model is the run above).
  text = (ROOT / "README.md").read_text()
  start = text.index("```python\nimport rrjax\nfrom rrjax import tokenizer\nfrom rrjax.ranking.rerank_loop")
  code = text[start + len("```python\n"):text.index("```", start + 10)]
  proc = _python(code, tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  order, parsers = map(ast.literal_eval, proc.stdout.strip().splitlines()[-2:])
  assert sorted(order) == ["d1", "d2", "d3"] and len(parsers) == 1, proc.stdout
