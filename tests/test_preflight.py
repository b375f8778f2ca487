"""python -m rrjax.preflight: the real TPU compiler on a libtpu topology, cpu:N as the run itself compiles, exit
codes, and the memory the chunked loss saves (compile only: nothing is allocated or run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import train_fixtures as F
from rrjax import sharding
from rrjax.model.qwen2 import Qwen2, Qwen2Config
from rrjax.train import __main__ as entry
from rrjax.train import optim, sft
from rrjax.train import state as state_lib
from rrjax.train.config import OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]
SFT_7B = "configs/sft/reasonrank_7b.gin"
TINY = "configs/sft/tiny_cpu.gin"
GiB = 2**30


def _preflight(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_PLATFORMS", None)  # the CLI must stay quiet with libtpu installed and no TPU here
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "rrjax.preflight", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  report = None
  lines = proc.stdout.strip().splitlines()
  if lines and lines[-1].startswith("{"):
    report = json.loads(lines[-1])
  return proc, report


def _gin(params):
  return [a for p in params for a in ("--gin_param", p)]


def test_tpu_topology_reduced_model_fits_with_sane_numbers():
  """The 7B SFT recipe reduced (tiny widths with head_dim 128, Qwen2.5's 152k vocabulary, 2 layers, 4,096
  tokens per chip, full AdamW) on v5e:2x2 (4 chips, fsdp 4): compiled by libtpu's TPU compiler with the
  splash kernel. (0.5B widths compile in ~90 s on 2 cores; this in ~30.)"""
  proc, rep = _preflight("--gin_file", SFT_7B, *_gin([
      "model_preset.name = 'tiny'", "model_preset.head_dim = 128", "SFTDataConfig.seq_len = 4096",
      "TrainConfig.batch_size = 8", "TrainConfig.grad_accum = 2"]), "--topology", "v5e:2x2", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "WARNING: could not determine" not in proc.stderr  # libtpu's probe is kept quiet
  assert rep["fits"] and rep["device_kind"] == "TPU v5 lite" and rep["devices"] == 4 and rep["platform"] == "tpu"
  assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and rep["hbm_bytes"] == 16 * GiB
  assert rep["warnings"] == []  # splash, not xla
  (step,) = rep["programs"]
  params = Qwen2Config.tiny(head_dim=128).param_count()
  # Arguments: f32 parameters and both AdamW moments, a quarter each per chip, plus the int32 batch
  # (8 rows of 4,096 over 4 chips, 4 arrays).
  state, batch = 3 * 4 * params / 4, 4 * 2 * 4096 * 4
  assert state <= step["argument_bytes"] <= state * 1.01 + batch + 2**20
  assert step["alias_bytes"] >= 0.99 * state  # the donated state is updated in place
  # Temporaries: the loss's [1,024, 152k] float32 chunks and the gradient accumulator, not [4,096, 152k] logits.
  assert 4 * 1024 * 151936 < step["temp_bytes"] < 2 * GiB
  assert step["total_bytes"] == step["argument_bytes"] + step["output_bytes"] + step["temp_bytes"] - step["alias_bytes"]
  assert rep["peak_bytes"] == step["total_bytes"]


def test_oversized_exits_1_with_one_line_and_gin_typo_exits_2():
  # 65,536 tokens with unfused attention and no remat: the TPU compiler itself refuses it.
  proc, rep = _preflight("--gin_file", TINY, *_gin([
      "SFTDataConfig.seq_len = 65536", "model_preset.attention = 'xla'", "model_preset.remat = 'none'",
      "TrainConfig.batch_size = 4", "model_preset.vocab_size = 512", "TrainConfig.mesh = @MeshConfig()",
      "MeshConfig.data = 1", "MeshConfig.fsdp = 4"]), "--topology", "v5e:2x2", "--json")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert rep["fits"] is False and "exceeds available HBM" in rep["programs"][0]["error"]
  reason = [line for line in proc.stderr.splitlines() if line.startswith("rrjax.preflight: does not fit")]
  assert len(reason) == 1 and "train_step" in reason[0] and "15.75G" in reason[0], proc.stderr
  assert "attends with attention='xla' on tpu" in proc.stderr  # the kernel choice is part of the check
  # A budget smaller than what a program needs: our own check, same one-line form.
  proc, rep = _preflight("--gin_file", TINY, "--gin_param", "model_preset.vocab_size = 512", "--topology", "cpu:2",
                         "--hbm", "0.001", "--json")
  assert proc.returncode == 1 and rep["fits"] is False and rep["hbm_bytes"] == int(0.001 * GiB)
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "train_step needs" in err[0] and "GiB of cpu" in err[0], err
  proc, _ = _preflight("--gin_file", TINY, "--gin_param", "TrainConfg.num_steps = 3", "--topology", "cpu:2")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1 and "TrainConfg" in err[0], proc.stderr
  proc, _ = _preflight("--gin_file", TINY, "--topology", "v9z:banana")
  assert proc.returncode == 2 and "--topology" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cpu_preflight_describes_what_the_run_compiles(tmp_path):
  """cpu:8 of the tiny SFT recipe: the programs a tiny run compiles before its first step (its own
  preflight.json): the same argument, output and aliased bytes; temporaries differ only by the fused-kernel
  scratch that preflight's compile flag exposes."""
  F.small_tokenizer(tmp_path / "tok")
  F.write_sft(tmp_path / "sft.json")
  params = F.gin_params(tmp_path / "run", tmp_path / "sft.json", tmp_path / "tok", **{
      "TrainConfig.num_steps": 2, "TrainConfig.export_hf": False, "CheckpointConfig.async_save": False})
  config, _ = entry.run([TINY], params)
  ran = json.loads((Path(config.run_dir) / "preflight.json").read_text())
  assert ran["devices"] == 8 and ran["fits"]
  # The run's cost entry (rrjax.cost): counted against useful work; CPU devices have no chip, so no roofline.
  c = ran["programs"][0]["cost"]
  for k in ("flops", "hbm_bytes", "useful_flops", "useful_hbm_bytes", "flops_ratio", "hbm_bytes_ratio"):
    assert isinstance(c[k], float) and c[k] > 0, (k, c)
  assert c["flops"] >= c["useful_flops"] and c["roofline_seconds"] is None and ran["chip"] is None
  assert ran["step_seconds"] is None and "trip counts" in c["counted"]
  proc, rep = _preflight("--gin_file", TINY, *_gin(params), "--topology", "cpu:8", "--platform", "cpu", "--json")
  assert proc.returncode == 0, proc.stderr
  (a,), (b,) = ran["programs"], rep["programs"]
  assert a["name"] == b["name"] == "train_step"
  for k in ("argument_bytes", "output_bytes", "alias_bytes"):
    assert a[k] == b[k], k
  # XLA:CPU fuses differently with its fused-kernel library off (scratch then counted): close, not equal.
  assert 0.8 * a["temp_bytes"] <= b["temp_bytes"] <= 1.5 * a["temp_bytes"]
  assert rep["mesh"] == ran["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}


def _step_temp_bytes(chunk_tokens: int, seq: int) -> tuple[int, int]:
  # Chunked attention too, so XLA:CPU's 8k x 8k attention scores do not swamp what the loss holds.
  cfg = Qwen2Config.qwen2_5_0_5b(num_layers=1, remat="full", attention="chunked")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  tx, lr = optim.make_optimizer(OptimizerConfig(), 10)
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = jax.jit(sft.make_train_step(lay.graphdef, tx, lr, chunk_tokens=chunk_tokens), donate_argnums=(0,))
  batch = {k: jax.ShapeDtypeStruct((1, seq), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
  with jax.set_mesh(mesh):
    stats = step.lower(lay.abstract, batch).compile().memory_analysis()
  return int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)


@pytest.mark.slow
def test_chunked_loss_keeps_temporaries_small():
  """0.5B widths (152k vocabulary), 1 layer, 8,192 tokens: the unchunked loss holds [T, V] float32 logits,
  their log-softmax and gradient (4.6 GiB each); with chunks of 1,024 positions the step's temporaries are
  under a third of the unchunked step's (measured: 3.2 against 10.7 GiB)."""
  chunked, args = _step_temp_bytes(1024, 8192)
  whole, args0 = _step_temp_bytes(0, 8192)
  assert args == args0
  logits = 8192 * 151936 * 4
  assert whole > 2 * logits, whole / GiB
  assert chunked < whole / 3, (chunked / GiB, whole / GiB)


def test_grpo_preflight_with_gpu_settings_compiles_every_program():
  """cpu:N models GPUs: bf16, cuDNN prefill built as its chunked stand-in and one-token decode with XLA (cuDNN
  cannot compile on CPU); every GRPO program compiles, the rollout prefill no larger than the engine's."""
  proc, rep = _preflight("--gin_file", "configs/grpo/tiny_cpu.gin", "--gin_param", "model_preset.vocab_size = 512",
                         "--topology", "cpu:2", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert rep["platform"] == "gpu" and rep["fits"]
  assert [p["name"] for p in rep["programs"]] == ["rollout_prefill", "rollout_insert", "rollout_decode",
                                                  "logprob_pass", "update"]
