"""GRPO: the loss pieces against direct NumPy, the policy-gradient identity, LoRA merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_fixtures as F
from rrjax.model.qwen2 import Qwen2
from rrjax.model import lora
from rrjax.train import grpo
from rrjax.train.config import LoraConfig


def np_advantages(r_PxG, eps=1e-6):
  out = np.zeros_like(r_PxG)
  for p, row in enumerate(r_PxG):
    out[p] = (row - row.mean()) / (np.std(row, ddof=1) + eps)
  return out


def np_policy_loss(logp, old, adv, mask, clip_low, clip_high, dual):
  """verl 0.4 compute_policy_loss (token-mean), written element by element."""
  total, count, clipped_n, lower_n = 0.0, 0.0, 0.0, 0.0
  for b in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      if not mask[b, t]:
        continue
      ratio = np.exp(logp[b, t] - old[b, t])
      l1 = -adv[b] * ratio
      l2 = -adv[b] * min(max(ratio, 1 - clip_low), 1 + clip_high)
      clipped = max(l1, l2)
      l3 = -adv[b] * dual
      loss = min(l3, clipped) if adv[b] < 0 else clipped
      total += loss
      count += 1
      clipped_n += float(l2 > l1)
      lower_n += float(clipped > l3 and adv[b] < 0)
  return total / count, clipped_n / count, lower_n / count


def np_k3(logp, ref):
  kl = np.clip(ref - logp, -20, 20)
  return np.clip(np.exp(kl) - kl - 1, -10, 10)


def test_advantages_match_numpy():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(16, 8)).astype(np.float32)
  r[3] = 0.5  # a group with equal rewards: zero advantages, no NaN
  got = np.asarray(grpo.group_advantages(jnp.asarray(r)))
  np.testing.assert_allclose(got, np_advantages(r), rtol=1e-5, atol=1e-5)
  assert np.all(got[3] == 0)
  np.testing.assert_array_equal(np.asarray(grpo.group_advantages(jnp.asarray(r[:, :1]))), r[:, :1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_and_kl_match_numpy(seed):
  rng = np.random.default_rng(seed)
  B, T = 6, 11
  logp = rng.normal(-2, 1, (B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 1.2, (B, T))).astype(np.float32)  # ratios far outside [0.8, 1.2], some > 3
  adv = rng.normal(0, 2, B).astype(np.float32)
  mask = (rng.random((B, T)) < 0.7).astype(np.float32)
  loss, clipfrac, lower, ppo_kl = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                                   jnp.asarray(mask), clip_low=0.2, clip_high=0.28, dual_clip=3.0)
  want_loss, want_clip, want_lower = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0)
  assert abs(float(loss) - want_loss) < 1e-5
  assert abs(float(clipfrac) - want_clip) < 1e-6 and abs(float(lower) - want_lower) < 1e-6
  assert want_lower > 0  # the dual clip was exercised
  assert abs(float(ppo_kl) - float(((old - logp) * mask).sum() / mask.sum())) < 1e-5
  ref = (logp + rng.normal(0, 1, (B, T))).astype(np.float32)
  np.testing.assert_allclose(np.asarray(grpo.low_var_kl(jnp.asarray(logp), jnp.asarray(ref))), np_k3(logp, ref),
                             rtol=1e-5, atol=1e-6)


def test_identical_policies_give_the_plain_policy_gradient():
  """ratio = 1 and beta = 0: d loss = -token_mean(A * d log p)."""
  cfg = F.tiny_config()
  graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 12)), jnp.int32)
  segments = jnp.ones((4, 12), jnp.int32)
  mask = jnp.asarray((np.arange(11)[None] >= 5).repeat(4, 0), jnp.float32)
  adv = jnp.asarray([1.5, -0.5, 0.3, -1.3], jnp.float32)
  old = jax.lax.stop_gradient(grpo.token_logprobs(nnx.merge(graphdef, params), tokens, segments)[0])

  def surrogate(p):
    logp, _ = grpo.token_logprobs(nnx.merge(graphdef, p), tokens, segments)
    return grpo.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)[0]

  def plain(p):
    logp, _ = grpo.token_logprobs(nnx.merge(graphdef, p), tokens, segments)
    return -grpo.masked_mean(adv[:, None] * logp, mask)

  g1, g2 = jax.grad(surrogate)(params), jax.grad(plain)(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_lora_merged_weights_are_base_plus_scaled_ba():
  cfg = F.tiny_config()
  base = Qwen2(cfg, rngs=nnx.Rngs(0))
  adapted = lora.apply_lora(base, LoraConfig(rank=4, alpha=8.0, targets=("q", "down")), seed=1)
  tokens = jnp.arange(3, 15)[None]
  np.testing.assert_array_equal(np.asarray(adapted(tokens)), np.asarray(base(tokens)))  # B = 0 at start
  state = nnx.state(adapted, nnx.LoRAParam)
  for i, (_, v) in enumerate(nnx.to_flat_state(state)):
    v[...] = jax.random.normal(jax.random.key(i), v.shape) * 0.05
  nnx.update(adapted, state)
  merged = lora.merge_lora(adapted)
  a = np.asarray(adapted.layers.q_lora_a[...])  # [L, D, r]
  b = np.asarray(adapted.layers.q_lora_b[...])  # [L, r, N, H]
  want = np.asarray(base.layers.q_kernel[...]) + (8.0 / 4) * np.einsum("ldr,lrnh->ldnh", a, b)
  np.testing.assert_allclose(np.asarray(merged.layers.q_kernel[...]), want, rtol=1e-5, atol=1e-6)
  a, b = np.asarray(adapted.layers.down_lora_a[...]), np.asarray(adapted.layers.down_lora_b[...])
  want = np.asarray(base.layers.down_kernel[...]) + 2.0 * np.einsum("lfr,lrd->lfd", a, b)
  np.testing.assert_allclose(np.asarray(merged.layers.down_kernel[...]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(merged.layers.k_kernel[...]), np.asarray(base.layers.k_kernel[...]))
  np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(adapted(tokens)), atol=1e-5)
  assert not hasattr(merged.layers, "q_lora_a")


# ---------------------------------------------------------------- end to end through the shared loop

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import safetensors.numpy  # noqa: E402

from rrjax import tokenizer as tokenizer_lib  # noqa: E402
from rrjax.data import rl as rl_data  # noqa: E402
from rrjax.train import __main__ as entry  # noqa: E402
from rrjax.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT_GIN = str(ROOT / "configs" / "sft" / "tiny_cpu.gin")
GRPO_GIN = str(ROOT / "configs" / "grpo" / "tiny_cpu.gin")


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
  """A tiny model that learned the answer format by SFT (always "cheaper first"), and RL rows whose
  relevant passage is the more expensive one: the policy must learn the opposite preference from reward."""
  d = tmp_path_factory.mktemp("grpo")
  F.small_tokenizer(d / "tok")
  F.write_sft(d / "sft.json")
  entry.run([SFT_GIN], F.gin_params(d / "sft", d / "sft.json", d / "tok", **{
      "TrainConfig.num_steps": 250, "OptimizerConfig.lr": 1e-2, "OptimizerConfig.warmup_ratio": 0.0,
      "SFTDataConfig.packing": False, "CheckpointConfig.every_steps": 250, "TrainConfig.export_hf": False}))
  tok = tokenizer_lib.load(d / "tok")
  rows = []
  for i, r in enumerate(F.sft_rows(8)):
    prompt = tok.apply_chat_template([{"role": "system", "content": r["system"]},
                                      {"role": "user", "content": r["instruction"]}])
    cheaper_first = "[1] > [2]" in r["output"]
    expensive = "d2" if cheaper_first else "d1"
    gold = "[2] > [1]" if cheaper_first else "[1] > [2]"
    rows.append(rl_data.RLRow(prompt=prompt, gold_ranking=gold, initial_list=("d1", "d2"),
                              final_list=(expensive, "d1" if expensive == "d2" else "d2"),
                              relevant_docids=(expensive,), qid=str(i)))
  rl_data.write_rl_jsonl(d / "rl.jsonl", rows)
  return d


def _grpo_params(d, run, **extra):
  return F.gin_params(d / run, d / "sft.json", d / "tok", **{
      "TrainConfig.init_from": repr(str(d / "sft")), "RLDataConfig.train_files": f"({str(d / 'rl.jsonl')!r},)",
      **extra})


@pytest.mark.slow
def test_grpo_raises_mean_reward(rl_setup):
  config, state = entry.run([GRPO_GIN], _grpo_params(rl_setup, "grpo", **{
      "TrainConfig.num_steps": 30, "OptimizerConfig.lr": 5e-4, "TrainConfig.batch_size": 8,
      "CheckpointConfig.every_steps": 8}))
  metrics = read_metrics(config.run_dir)
  assert [m["step"] for m in metrics] == list(range(1, 31))
  first = np.mean([m["reward_mean"] for m in metrics[:3]])
  last = np.mean([m["reward_mean"] for m in metrics[-5:]])
  first_ndcg = np.mean([m["ndcg10"] for m in metrics[:3]])
  last_ndcg = np.mean([m["ndcg10"] for m in metrics[-5:]])
  # The SFT policy ranks the relevant passage second (nDCG 0.63, reward 0.88); the best is 1.3.
  assert first < 0.95 and last > first + 0.07 and last_ndcg > first_ndcg + 0.05, (first, last, first_ndcg, last_ndcg)
  assert all(m["format_fail_rate"] < 0.5 for m in metrics)
  assert {"kl", "clip_frac", "entropy", "response_length", "ndcg10", "pg_loss", "rollout_probs_diff_mean",
          "rollout_probs_diff_max"} <= set(metrics[-1])
  assert (Path(config.run_dir) / "preflight.json").exists()
  assert int(state.step) == 30 * 2  # two optimizer updates per GRPO step


@pytest.mark.slow
def test_grpo_with_lora_trains_only_adapters(rl_setup):
  config, state = entry.run([GRPO_GIN], _grpo_params(rl_setup, "grpo_lora", **{
      "TrainConfig.num_steps": 3, "TrainConfig.lora": "@LoraConfig()", "LoraConfig.rank": 4,
      "LoraConfig.alpha": 8.0, "OptimizerConfig.lr": 1e-2}))
  assert all(k.endswith(("_lora_a", "_lora_b")) for k in state.params["layers"])
  import rrjax
  base = rrjax.from_pretrained(rl_setup / "sft")
  np.testing.assert_array_equal(np.asarray(state.frozen["layers"]["up_kernel"]), np.asarray(base.layers.up_kernel[...]))
  metrics = read_metrics(config.run_dir)
  assert len(metrics) == 3 and all(np.isfinite(m["kl"]) for m in metrics)
  assert metrics[-1]["kl"] > 0  # the policy moved away from the frozen base it is measured against
  merged = rrjax.from_pretrained(Path(config.run_dir) / "hf")
  assert not np.array_equal(np.asarray(merged.layers.up_kernel[...]), np.asarray(base.layers.up_kernel[...]))


def _cli(args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "rrjax.train", "--gin_file", GRPO_GIN, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_grpo_kill_and_resume_is_exact(rl_setup):
  common = {"TrainConfig.num_steps": 12, "CheckpointConfig.every_steps": 2, "TrainConfig.batch_size": 2}
  ref = _cli([f"--gin_param={p}" for p in _grpo_params(rl_setup, "ref", **common)])
  assert ref.wait(timeout=900) == 0, ref.stderr.read()[-3000:]
  args = [f"--gin_param={p}" for p in _grpo_params(rl_setup, "killed", **common)]
  proc = _cli(args)
  metrics = rl_setup / "killed" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = _cli(args)
  assert again.wait(timeout=900) == 0, again.stderr.read()[-3000:]
  assert [m["step"] for m in read_metrics(rl_setup / "killed")] == list(range(1, 13))
  assert [m["reward_mean"] for m in read_metrics(rl_setup / "killed")] == \
      [m["reward_mean"] for m in read_metrics(rl_setup / "ref")]
  a = safetensors.numpy.load_file(rl_setup / "ref" / "hf" / "model.safetensors")
  b = safetensors.numpy.load_file(rl_setup / "killed" / "hf" / "model.safetensors")
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_lora_reference_is_the_frozen_base():
  """Under LoRA the KL reference is the same graph with adapters zeroed: exactly the base model."""
  from rrjax.train import state as state_lib
  cfg = F.tiny_config()
  base = Qwen2(cfg, rngs=nnx.Rngs(0))
  adapted = lora.apply_lora(base, LoraConfig(rank=4, alpha=8.0), seed=1)
  graphdef, trainable, frozen = state_lib.split_model(adapted)
  trainable = jax.tree.map(lambda x: x + 0.05, nnx.to_pure_dict(trainable))  # trained adapters
  tokens = jnp.arange(3, 15)[None]
  segments = jnp.ones_like(tokens)
  ref = nnx.merge(graphdef, grpo._lora_off(trainable), nnx.to_pure_dict(frozen))
  np.testing.assert_allclose(np.asarray(grpo.token_logprobs(ref, tokens, segments)[0]),
                             np.asarray(grpo.token_logprobs(base, tokens, segments)[0]), atol=1e-6)
  policy = nnx.merge(graphdef, trainable, nnx.to_pure_dict(frozen))
  assert not np.allclose(np.asarray(policy(tokens)), np.asarray(base(tokens)), atol=1e-3)


# ---------------------------------------------------------------- the micro-batched update and the no-gradient pass


def _grpo_setup(g, data=2):
  from rrjax import sharding
  from rrjax.train import optim, state as state_lib
  from rrjax.train.config import OptimizerConfig
  cfg = F.tiny_config(tie_word_embeddings=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=data), devices=jax.devices()[:data])
  tx, lr = optim.make_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"), 10)
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  state = state_lib.init_state(Qwen2(cfg, rngs=nnx.Rngs(0)), tx, lay, 0)
  return cfg, mesh, tx, lr, lay, state


def _ragged_minibatch(rng, M, P, R, vocab):
  tokens = rng.integers(3, vocab, (M, P + R)).astype(np.int32)
  segments = np.zeros((M, P + R), np.int32)
  mask = np.zeros((M, R), np.float32)
  for i in range(M):
    p, r = rng.integers(2, P + 1), rng.integers(1, R + 1)  # ragged prompts (left) and responses (right)
    segments[i, P - p:P + r] = 1
    mask[i, :r] = 1
  return {"tokens": tokens, "segment_ids": segments, "mask": mask,
          "old_logp": rng.normal(-3, 0.3, (M, R)).astype(np.float32),
          "ref_logp": rng.normal(-3, 0.3, (M, R)).astype(np.float32), "adv": rng.normal(0, 1, M).astype(np.float32)}


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean"])
def test_micro_batched_update_equals_one_shot(loss_agg):
  """A scan over micro-batches of one sequence per device accumulates the same loss and gradient as the
  whole mini-batch at once, for either aggregation, and the loss is that aggregation of the per-token terms."""
  from rrjax.train.config import GRPOConfig
  g = GRPOConfig(loss_agg=loss_agg, kl_coef=0.05, clip_ratio_high=0.28)
  cfg, mesh, tx, lr, lay, state = _grpo_setup(g)
  mb = _ragged_minibatch(np.random.default_rng(0), 8, 10, 7, cfg.vocab_size)
  results = []
  for micro_rows, chunk in ((8, 0), (2, 3)):  # one shot; one sequence per device per micro-step, chunked
    update = jax.jit(grpo.make_update(lay.graphdef, tx, lr, g, micro_rows=micro_rows, shards=2, chunk=chunk))
    with jax.set_mesh(mesh):
      results.append(jax.device_get(update(state, {k: jnp.asarray(v) for k, v in mb.items()})))
  (s0, m0), *rest = results
  for s, m in rest:
    for k in ("loss", "pg_loss", "kl", "clip_frac", "grad_norm"):
      assert abs(m0[k] - m[k]) < 1e-5, (k, m0[k], m[k])
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The aggregation itself, from the policy's own log-probs.
  model = nnx.merge(lay.graphdef, state.params, state.frozen)
  logp = np.asarray(grpo.response_logprobs(model, jnp.asarray(mb["tokens"]), jnp.asarray(mb["segment_ids"]), 7)[0])
  pg, *_ = grpo.policy_terms(jnp.asarray(logp), jnp.asarray(mb["old_logp"]), jnp.asarray(mb["adv"]), clip_low=0.2,
                             clip_high=0.28, dual_clip=3.0)
  per_token = np.asarray(pg) + 0.05 * np_k3(logp, mb["ref_logp"])
  m = mb["mask"]
  if loss_agg == "seq_mean_token_mean":
    want = np.mean([(per_token[i] * m[i]).sum() / m[i].sum() for i in range(len(m))])
  else:
    want = (per_token * m).sum() / m.sum()
  assert abs(m0["loss"] - want) < 1e-5


def test_prompt_over_max_prompt_tokens_is_refused_with_its_line(tmp_path):
  from rrjax.train.config import GRPOConfig, TrainConfig
  tok = F.small_tokenizer(tmp_path / "tok")
  cfg, mesh = F.tiny_config(), sharding_mesh(2)
  config = TrainConfig(trainer="grpo", model=cfg, batch_size=2, num_steps=2,
                       grpo=GRPOConfig(rollouts_per_prompt=4, max_prompt_tokens=96))
  rows = [rl_data.RLRow(prompt=p, gold_ranking="[1] > [2]", initial_list=("a", "b"), final_list=("a", "b"),
                        relevant_docids=("a",), qid=str(i))
          for i, p in enumerate(["cost 1", "cost 2", " ".join(["passage"] * 200)])]
  rl_data.write_rl_jsonl(tmp_path / "rl.jsonl", rows)
  with pytest.raises(ValueError, match=r"rl\.jsonl:3: the prompt has \d+ tokens, more than "
                                       r"GRPOConfig.max_prompt_tokens=96"):
    grpo.GRPOTrainer(config, mesh, cfg, tok, rows=rl_data.read_rl(tmp_path / "rl.jsonl", tokenizer=tok))


def sharding_mesh(data):
  from rrjax import sharding
  return sharding.make_mesh(sharding.MeshConfig(data=data), devices=jax.devices()[:data])
