"""SFT through the shared loop: learning, exact sharding, response-only loss, resume, failures, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import train_fixtures as F
import rrjax
from rrjax import sharding
from rrjax import tokenizer as tokenizer_lib
from rrjax.model.qwen2 import Qwen2
from rrjax.train import __main__ as entry
from rrjax.train import loop, optim, sft
from rrjax.train import state as state_lib
from rrjax.train.config import OptimizerConfig
from rrjax.train.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_GIN = str(ROOT / "configs" / "sft" / "tiny_cpu.gin")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("train")
  F.small_tokenizer(d / "tok")
  F.write_sft(d / "sft.json")
  return d


def _config(workdir, run, **extra):
  return entry.parse_config([TINY_GIN], F.gin_params(workdir / run, workdir / "sft.json", workdir / "tok", **extra))


def _train(workdir, run, **extra):
  return entry.run([TINY_GIN], F.gin_params(workdir / run, workdir / "sft.json", workdir / "tok", **extra))


def test_loss_falls_and_model_memorises(workdir):
  config, _ = _train(workdir, "memorise", **{
      "TrainConfig.num_steps": 400, "OptimizerConfig.lr": 1e-2, "OptimizerConfig.warmup_ratio": 0.0,
      "SFTDataConfig.packing": False, "CheckpointConfig.every_steps": 50})
  metrics = read_metrics(config.run_dir)
  assert [m["step"] for m in metrics] == list(range(1, 401))
  assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"] and metrics[-1]["loss"] < 0.3
  run = Path(config.run_dir)
  assert (run / "operative_config.gin").read_text().count("TrainConfig.num_steps = 400") == 1
  assert (run / "curves.png").exists() and (run / "hf" / "config.json").exists()
  assert list((run / "tensorboard").iterdir())
  # The exported model answers every training prompt with its memorised response. (At lr 1e-2 the trajectory
  # is chaotic: float-order changes in attention moved 250 steps' final loss from 0.012 to 0.042 and one row's
  # digit; 400 steps end near 1e-3 either way.)
  model = rrjax.from_pretrained(run / "hf")
  tok = tokenizer_lib.load(run / "hf")
  rows = F.sft_rows()
  prompts = [tok.encode(tok.apply_chat_template([{"role": "system", "content": row["system"]},
                                                 {"role": "user", "content": row["instruction"]}])) for row in rows]
  out = rrjax.generate(model, prompts, max_new_tokens=40, stop_ids=tok.stop_ids)
  assert [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens] == [row["output"] for row in rows]


def _random_batch(rng, B, T, vocab):
  tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
  loss_mask = (np.arange(T)[None] >= T // 2).astype(np.int32).repeat(B, 0)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[1, T - 5:] = 0  # some padding
  loss_mask[1, T - 5:] = 0
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def _one_step(mesh, batch, grad_accum=1, chunk_tokens=0):
  cfg = F.tiny_config(tie_word_embeddings=False)
  tx, lr = optim.make_optimizer(OptimizerConfig(lr=1e-4, warmup_ratio=0.0), 10)
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  state = state_lib.init_state(Qwen2(cfg, rngs=nnx.Rngs(0)), tx, lay, 0)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = batch["tokens"].shape[0]
  step = jax.jit(sft.make_train_step(lay.graphdef, tx, lr, rows // grad_accum, shards=shards,
                                     chunk_tokens=chunk_tokens),
                 in_shardings=(lay.shardings, None), out_shardings=(lay.shardings, None))
  with jax.set_mesh(mesh):
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  return state, jax.device_get(metrics)


def test_sharded_step_equals_single_device():
  batch = _random_batch(np.random.default_rng(0), 8, 24, 512)
  single = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  full = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  s1, m1 = _one_step(single, batch)
  s8, m8 = _one_step(full, batch)
  assert abs(m1["loss"] - m8["loss"]) < 1e-5
  assert s8.params["layers"]["q_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Gradient accumulation over 4 micro-batches is the same token-mean step, on one device and on eight.
  s4, m4 = _one_step(single, batch, grad_accum=4)
  assert abs(m1["loss"] - m4["loss"]) < 1e-5
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  s84, m84 = _one_step(full, batch, grad_accum=2)  # each of 4 data shards feeds both micro-batches
  assert abs(m1["loss"] - m84["loss"]) < 1e-5
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s84.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_chunked_log_probs_equal_the_whole_sequence():
  """Loss and gradients with [chunk, V] logits at a time (scan + remat) equal the unchunked path (f32), with a
  ragged last chunk, on a 2x2x2 mesh with two micro-batches."""
  batch = _random_batch(np.random.default_rng(3), 8, 40, 512)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  s0, m0 = _one_step(mesh, batch, grad_accum=2)
  s, m = _one_step(mesh, batch, grad_accum=2, chunk_tokens=7)  # 40 positions: 5 chunks of 7 and one of 5
  assert abs(m0["loss"] - m["loss"]) < 1e-5 and abs(m0["grad_norm"] - m["grad_norm"]) < 1e-5
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_optimizer_state_is_sharded_like_its_parameters(tmp_path):
  """AdamW's m and v carry their parameter's sharding (not replicated), scalars are replicated, on a 2x2x2
  mesh; a checkpoint restore puts every leaf back the same way."""
  from rrjax import checkpoints
  cfg = F.tiny_config(tie_word_embeddings=False)
  tx, _ = optim.make_optimizer(OptimizerConfig(), 10)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  state = state_lib.init_state(sharding.create_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), mesh), tx, lay, 0)
  adam = state.opt_state[1][0]
  rep = jax.sharding.PartitionSpec()

  def check(opt, params):
    adam = opt[1][0]
    for moments in (adam.mu, adam.nu):
      for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(moments), jax.tree.leaves(params)):
        assert m.sharding == p.sharding, (path, m.sharding, p.sharding)
    scalars = [x for x in jax.tree.leaves(opt) if x.ndim == 0]
    assert len(scalars) == 2 and all(x.sharding.spec == rep for x in scalars)  # Adam's and the schedule's counts
    return sum(m.addressable_shards[0].data.size for m in jax.tree.leaves(adam.mu))

  per_device = check(state.opt_state, state.params)
  assert per_device < 0.3 * sum(m.size for m in jax.tree.leaves(adam.mu))  # split, not replicated
  assert state.params["layers"]["q_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  ckpt = checkpoints.Checkpointer(tmp_path, async_save=False)
  loop._save(ckpt, 1, state, None, {})
  restored, step = loop._restore(ckpt, lay.abstract, None)
  ckpt.close()
  assert step == 1
  check(restored.opt_state, restored.params)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(restored.opt_state)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_and_padded_batches_give_the_same_step():
  """The same examples, one per padded row or packed several to a row (segment ids, positions restarting):
  the same loss and gradients (the same token-mean step)."""
  from rrjax.data import pipeline
  rng = np.random.default_rng(5)
  examples = []
  for n in (30, 12, 50, 7, 21, 40, 9, 16):
    tokens = rng.integers(3, 512, n).astype(np.int32)
    mask = (np.arange(n) >= n // 3).astype(np.int32)
    examples.append({"tokens": tokens, "loss_mask": mask})
  padded = {k: np.stack([pipeline._pad(e, 64, 0)[k] for e in examples]) for k in pipeline.BATCH_KEYS}
  packed = pipeline.pack_samples(examples, 64, row_multiple=4)
  assert packed["tokens"].shape == (4, 64) and packed["segment_ids"].max() >= 2
  assert int((packed["segment_ids"] > 0).sum()) == sum(len(e["tokens"]) for e in examples)
  single = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  sa, ma = _one_step(single, padded)
  sb, mb = _one_step(single, packed)
  assert ma["tokens"] == mb["tokens"] and abs(ma["loss"] - mb["loss"]) < 1e-5
  for a, b in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


class _Hidden:
  """A model whose hidden states are given: d loss / d hidden of the loss head alone."""

  def __init__(self, model, hidden):
    self.model, self.hidden = model, hidden

  def hidden_states(self, *args, **kw):
    return self.hidden, None

  def logits(self, h):
    return self.model.logits(h)


def test_prompt_tokens_get_no_gradient():
  cfg = F.tiny_config()
  model = Qwen2(cfg, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in _random_batch(np.random.default_rng(1), 2, 16, 512).items()}
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])[0]
  g = jax.grad(lambda h: sft.token_nll_sums(_Hidden(model, h), batch)[0])(hidden)
  _, weights = sft.pipeline.next_token_targets(batch, xp=jnp)
  per_position = np.asarray(jnp.abs(g).sum(-1))
  assert np.all(per_position[np.asarray(weights) == 0] == 0)
  assert np.all(per_position[np.asarray(weights) > 0] > 0)
  base = float(sft.token_nll_sums(model, batch)[0])
  # Changing a response token (a label) changes the loss ...
  changed = dict(batch, tokens=batch["tokens"].at[0, 12].set((batch["tokens"][0, 12] + 1) % 512))
  assert float(sft.token_nll_sums(model, changed)[0]) != base
  # ... changing the loss mask of prompt positions (weight already 0) does not.
  masked = dict(batch, loss_mask=batch["loss_mask"].at[:, 2].set(0))
  assert float(sft.token_nll_sums(model, masked)[0]) == base


def _cli(args, **kw):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "rrjax.train", "--gin_file", TINY_GIN, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _params_of(run_dir):
  return {k: v for k, v in safetensors.numpy.load_file(Path(run_dir) / "hf" / "model.safetensors").items()}


@pytest.mark.slow
def test_kill_and_resume_is_exact(workdir):
  common = {"TrainConfig.num_steps": 40, "CheckpointConfig.every_steps": 3, "SFTDataConfig.packing": True,
            "TrainConfig.batch_size": 4}
  ref = _cli([f"--gin_param={p}" for p in F.gin_params(workdir / "ref", workdir / "sft.json", workdir / "tok",
                                                        **common)])
  assert ref.wait(timeout=600) == 0, ref.stderr.read()
  args = [f"--gin_param={p}" for p in F.gin_params(workdir / "killed", workdir / "sft.json", workdir / "tok",
                                                    **common)]
  proc = _cli(args)
  metrics = workdir / "killed" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "training finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = len(metrics.read_text().splitlines())
  assert killed_at < 40
  again = _cli(args)
  assert again.wait(timeout=600) == 0, again.stderr.read()
  assert "resumed" in again.stdout.read()
  steps = [m["step"] for m in read_metrics(workdir / "killed")]
  assert steps == list(range(1, 41))  # each step exactly once
  ref_params, resumed_params = _params_of(workdir / "ref"), _params_of(workdir / "killed")
  assert sorted(ref_params) == sorted(resumed_params)
  for name in ref_params:
    np.testing.assert_array_equal(ref_params[name], resumed_params[name], err_msg=name)
  ref_loss = [m["loss"] for m in read_metrics(workdir / "ref")]
  assert [m["loss"] for m in read_metrics(workdir / "killed")] == ref_loss


def test_corrupt_latest_checkpoint_falls_back(workdir, caplog):
  extra = {"TrainConfig.num_steps": 6, "CheckpointConfig.every_steps": 2, "CheckpointConfig.async_save": False}
  config, _ = _train(workdir, "corrupt", **extra)
  ckpt_dir = Path(config.run_dir) / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4, 6]
  for f in (ckpt_dir / "6" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0" * 16)
  config, _ = _train(workdir, "corrupt", **{**extra, "TrainConfig.num_steps": 8})
  assert "step 6" in caplog.text and "cannot be restored" in caplog.text
  steps = [m["step"] for m in read_metrics(config.run_dir)]
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 5-6 were redone from step 4, and logged once


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workdir):
  config = _config(workdir, "nan", **{"TrainConfig.num_steps": 30, "CheckpointConfig.every_steps": 1,
                                       "OptimizerConfig.lr": 1e30, "OptimizerConfig.clip_norm": 0.0,
                                       "OptimizerConfig.warmup_ratio": 0.0})
  with pytest.raises(loop.TrainingDiverged, match=r"step \d+: loss .* not finite.*last good checkpoint is step"):
    loop.run(config, entry.trainers()[config.trainer])
  steps = [int(p.name) for p in (Path(config.run_dir) / "checkpoints").iterdir() if p.name.isdigit()]
  metrics = read_metrics(config.run_dir)
  assert all(np.isfinite(m["loss"]) for m in metrics)
  assert max(steps) == metrics[-1]["step"]


def test_bad_data_row_and_gin_typo_are_one_line_errors(workdir):
  bad = workdir / "bad.jsonl"
  bad.write_text(json.dumps(F.sft_rows(1)[0]) + "\n" + json.dumps({"system": "s", "output": "x"}) + "\n")
  proc = _cli([f"--gin_param={p}" for p in F.gin_params(workdir / "badrun", bad, workdir / "tok")])
  assert proc.wait(timeout=300) != 0
  err = proc.stderr.read().strip().splitlines()
  assert len(err) == 1 and "bad.jsonl:2" in err[0] and "instruction" in err[0], err
  out = proc.stdout.read()
  assert "Downloading" not in out and "rrjax: tokenizing the SFT files" in out, out  # local files: no TFDS download
  assert not (workdir / "badrun").exists()  # failed before training: no run directory left behind
  # A failed check on an existing directory leaves it as it was (nothing added, nothing overwritten).
  kept = workdir / "kept"
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  proc = _cli([f"--gin_param={p}" for p in F.gin_params(kept, workdir / "sft.json", workdir / "tok")]
              + ["--gin.SFTDataConfig.train_files=()"])
  assert proc.wait(timeout=300) == 2
  assert "SFTDataConfig.train_files: no training files configured" in proc.stderr.read()
  assert [p.name for p in kept.iterdir()] == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"
  # A typo in a binding names the binding, not the gin file.
  proc = _cli(["--gin_param=TrainConfg.num_steps = 3"])
  assert proc.wait(timeout=300) != 0
  err = proc.stderr.read().strip().splitlines()
  assert len(err) == 1 and "gin binding 'TrainConfg.num_steps = 3'" in err[0], err
  assert "tiny_cpu.gin" not in err[0] and "bindings string" not in err[0], err


def test_help_lists_every_flag_form(capsys):
  with pytest.raises(SystemExit):
    entry.parse_flags(["--help"])
  text = capsys.readouterr().out
  assert "--gin_file" in text and "--gin_param" in text and "--gin.NAME=VALUE" in text
  args = entry.parse_flags(["--gin_file=a.gin", "--gin.TrainConfig.num_steps=3", "--gin_param", "x.y = 1"])
  assert args.gin_file == ["a.gin"] and args.gin_param == ["x.y = 1", "TrainConfig.num_steps = 3"]


def test_export_cli_and_from_pretrained_of_a_run(workdir):
  config, state = _train(workdir, "export", **{"TrainConfig.num_steps": 3, "TrainConfig.export_hf": False})
  assert not (Path(config.run_dir) / "hf").exists()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = workdir / "exported"
  proc = subprocess.run([sys.executable, "-m", "rrjax.export", "--checkpoint", config.run_dir, "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  import torch
  import transformers
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ours = rrjax.from_pretrained(config.run_dir)
  tokens = np.arange(3, 20)[None]
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), theirs, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(ours.layers.up_kernel[...]),
                                np.asarray(state.params["layers"]["up_kernel"]))
  assert tokenizer_lib.load(out).encode("cost 5") == tokenizer_lib.load(workdir / "tok").encode("cost 5")
  bad = subprocess.run([sys.executable, "-m", "rrjax.export", "--checkpoint", str(workdir / "nothing"),
                        "--out", str(workdir / "x")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "nothing" in bad.stderr


def test_lora_run_updates_only_adapters(workdir):
  base = _config(workdir, "lora_base", **{"TrainConfig.num_steps": 2, "TrainConfig.export_hf": False})
  loop.run(base, entry.trainers()[base.trainer])
  config, state = _train(workdir, "lora", **{
      "TrainConfig.num_steps": 4, "TrainConfig.init_from": repr(str(base.run_dir)),
      "TrainConfig.lora": "@LoraConfig()", "LoraConfig.rank": 4, "LoraConfig.alpha": 8.0,
      "OptimizerConfig.lr": 1e-2})
  assert set(state.params["layers"]) == {f"{t}_lora_{ab}" for t in ("q", "k", "v", "o", "gate", "up", "down")
                                          for ab in "ab"}
  start = rrjax.from_pretrained(base.run_dir)
  np.testing.assert_array_equal(np.asarray(state.frozen["layers"]["q_kernel"]),
                                np.asarray(start.layers.q_kernel[...]))
  assert float(jnp.abs(state.params["layers"]["q_lora_b"]).max()) > 0
  merged = rrjax.from_pretrained(Path(config.run_dir) / "hf")
  assert not np.array_equal(np.asarray(merged.layers.q_kernel[...]), np.asarray(start.layers.q_kernel[...]))
