"""Term by term against upstream: NumPy transcriptions of verl 0.4 (GRPO loss aggregation, micro-batch
scaling, balance_batch) and HF Trainer 4.52 (SFT loss normalisation under gradient accumulation), the RL
prompt rendering of verl's RLHFDataset, and verl's skipping of non-finite updates (see rrjax/train/UPSTREAM.md)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train_fixtures as F
from rrjax import sharding
from rrjax.data import pipeline
from rrjax.data import rl as rl_data
from rrjax.model.qwen2 import Qwen2
from rrjax.train import grpo, loop, sft
from rrjax.train import state as state_lib
from rrjax.train.config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- verl 0.4, transcribed


def verl_masked_mean(values, mask):
  return (values * mask).sum() / (mask.sum() + 1e-8)  # verl.utils.torch_functional.masked_mean


def verl_agg_loss(loss_mat, loss_mask, mode):
  """core_algos.agg_loss."""
  if mode == "token-mean":
    return verl_masked_mean(loss_mat, loss_mask)
  if mode == "seq-mean-token-mean":
    return np.mean((loss_mat * loss_mask).sum(-1) / loss_mask.sum(-1))
  raise ValueError(mode)


def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, mode):
  """core_algos.compute_policy_loss (returns pg_loss)."""
  negative_approx_kl = log_prob - old_log_prob
  ratio = np.exp(negative_approx_kl)
  adv = advantages[:, None]
  pg_losses1 = -adv * ratio
  pg_losses2 = -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high)
  clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
  pg_losses3 = -adv * clip_ratio_c
  clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
  pg_losses = np.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
  return verl_agg_loss(pg_losses, response_mask, mode)


def verl_low_var_kl(logprob, ref_logprob):
  """core_algos.kl_penalty(..., "low_var_kl") in v0.4.0 (core_algos.py:594-598): only the result is clamped."""
  kl = ref_logprob - logprob
  return np.clip(np.exp(kl) - kl - 1, -10, 10)


def test_low_var_kl_is_verl_040s_everywhere():
  """rrjax also clamps the log-ratio to [-20, 20] (v0.4.1's form, keeping exp finite): the same values."""
  logp = np.linspace(-60.0, 0.0, 241)
  ref = np.linspace(-5.0, -45.0, 241)[::-1]
  want = verl_low_var_kl(logp.astype(np.float64), ref.astype(np.float64))
  assert (want == 10).any() and (want < 10).any()
  np.testing.assert_allclose(np.asarray(grpo.low_var_kl(jnp.asarray(logp), jnp.asarray(ref))), want, rtol=1e-5, atol=1e-6)


def verl_update_loss(logp, old, ref, adv, mask, *, ranks, micro_per_gpu, g, mode="token-mean"):
  """dp_actor.update_policy for one mini-batch: each rank's contiguous share in micro-batches of
  micro_per_gpu sequences; per micro-batch pg + kl_coef * kl (both agg_loss'd), divided by the number of
  accumulation steps; ranks averaged (FSDP's gradient all-reduce mean) -> the loss whose gradient is applied."""
  n = len(adv)
  per_rank = n // ranks
  accumulation = per_rank // micro_per_gpu
  total = 0.0
  for r in range(ranks):
    for k in range(accumulation):
      i = slice(r * per_rank + k * micro_per_gpu, r * per_rank + (k + 1) * micro_per_gpu)
      pg = verl_policy_loss(old[i], logp[i], adv[i], mask[i], g.clip_ratio_low, g.clip_ratio_high, g.dual_clip, mode)
      kl = verl_agg_loss(verl_low_var_kl(logp[i], ref[i]), mask[i], mode)
      total += (pg + kl * g.kl_coef) / accumulation
  return total / ranks


def _ragged(rng, n, R):
  mask = np.zeros((n, R), np.float32)
  for i, r in enumerate(rng.integers(1, R + 1, n)):
    mask[i, :r] = 1.0
  logp = rng.normal(-2, 1, (n, R)).astype(np.float32)
  return (logp, (logp + rng.normal(0, 0.4, (n, R))).astype(np.float32),
          (logp + rng.normal(0, 0.5, (n, R))).astype(np.float32), rng.normal(0, 1.5, n).astype(np.float32), mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_matches_verl_for_both_aggregations(seed):
  """'seq_mean_token_mean' is verl with one sequence per GPU per micro-batch on any number of GPUs;
  'token_mean' is verl's token-mean over the whole mini-batch in one micro-batch (ragged responses)."""
  logp, old, ref, adv, mask = _ragged(np.random.default_rng(seed), 16, 13)
  for agg, ranks, micro in (("seq_mean_token_mean", 8, 1), ("seq_mean_token_mean", 2, 1),
                            ("token_mean", 1, 16)):
    g = GRPOConfig(loss_agg=agg, kl_coef=0.05, clip_ratio_high=0.28)
    ours = float(grpo.minibatch_loss(*map(jnp.asarray, (logp, old, ref, adv, mask)), g))
    want = verl_update_loss(logp.astype(np.float64), old, ref, adv, mask, ranks=ranks, micro_per_gpu=micro, g=g)
    assert abs(ours - want) < 1e-6, (agg, ranks, ours, want)
  # verl's seq-mean-token-mean mode in larger micro-batches is the same number again.
  g = GRPOConfig(loss_agg="seq_mean_token_mean", kl_coef=0.05, clip_ratio_high=0.28)
  want = verl_update_loss(logp.astype(np.float64), old, ref, adv, mask, ranks=2, micro_per_gpu=4, g=g,
                          mode="seq-mean-token-mean")
  assert abs(float(grpo.minibatch_loss(*map(jnp.asarray, (logp, old, ref, adv, mask)), g)) - want) < 1e-6


def test_balanced_partitions_are_verl_karmarkar_karp():
  """Equal-count partitions with the largest-differencing spread, each sorted; mini-batches take each
  shard's partition in order (verl's dispatch then `batch.split`)."""
  rng = np.random.default_rng(0)
  lens = rng.integers(100, 4000, 32).tolist()
  parts = grpo.balanced_partitions(lens, 4)
  assert sorted(sum(parts, [])) == list(range(32)) and all(len(p) == 8 and p == sorted(p) for p in parts)
  sums = [sum(lens[i] for i in p) for p in parts]
  contiguous = [sum(lens[i * 8:(i + 1) * 8]) for i in range(4)]
  assert max(sums) - min(sums) < 0.1 * (max(contiguous) - min(contiguous)) + 200
  # {5,1} / {4,2} both sum to 6; verl orders sets by (sum, size, items), largest first.
  assert grpo.balanced_partitions([5, 1, 4, 2], 2) == [[2, 3], [0, 1]]
  rows = grpo.minibatch_rows(lens, 4, 2, balance=True)
  assert [r.tolist() for r in rows] == [sum((p[:4] for p in parts), []), sum((p[4:] for p in parts), [])]
  assert [r.tolist() for r in grpo.minibatch_rows(lens, 4, 2, balance=False)] == [list(range(16)),
                                                                                 list(range(16, 32))]


# ---------------------------------------------------------------- HF Trainer 4.52, transcribed


def hf_trainer_objective(row_nll_sums, row_labels, *, devices, accumulation):
  """transformers 4.52 Trainer under DeepSpeed, one optimizer step: each device takes `accumulation`
  micro-batches of its contiguous rows; num_items_in_batch = that device's label count over them
  (get_batch_samples, average_tokens_across_devices=False); each micro-batch's loss is its summed NLL /
  num_items_in_batch (ForCausalLMLoss, reduction='sum'), backward without GAS scaling (scale_wrt_gas=False
  under DeepSpeed); DeepSpeed averages the devices' gradients."""
  n = len(row_nll_sums)
  per_device = n // devices
  per_micro = per_device // accumulation
  total = 0.0
  for d in range(devices):
    rows = range(d * per_device, (d + 1) * per_device)
    num_items = sum(row_labels[r] for r in rows)
    for k in range(accumulation):
      micro = rows[k * per_micro:(k + 1) * per_micro]
      total += sum(row_nll_sums[r] for r in micro) / num_items
  return total / devices


def test_sft_per_device_normalisation_matches_hf_trainer():
  """8 simulated devices, 2 micro-batches each, ragged label counts: the step's loss and gradient are HF's."""
  cfg = F.tiny_config(tie_word_embeddings=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  rng = np.random.default_rng(7)
  N, T = 16, 24
  tokens = rng.integers(3, cfg.vocab_size, (N, T)).astype(np.int32)
  starts = rng.integers(2, T - 1, N)  # ragged prompts: 1 to 21 label tokens per row
  loss_mask = (np.arange(T)[None] >= starts[:, None]).astype(np.int32)
  segments = np.ones((N, T), np.int32)
  segments[3, 18:] = 0
  loss_mask[3, 18:] = 0
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)).copy()
  batch = {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segments, "positions": positions}
  tx = optax.sgd(1.0)  # the update is minus the gradient
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  state = state_lib.init_state(Qwen2(cfg, rngs=nnx.Rngs(0)), tx, lay, 0)
  params = jax.device_get(state.params)
  step = jax.jit(sft.make_train_step(lay.graphdef, tx, lambda s: 1.0, N // 2, shards=8,
                                     loss_norm="per_device_token_mean"))
  with jax.set_mesh(mesh):
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, jax.device_get(new.params))

  graphdef, p0 = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0)))
  rows = {k: jnp.asarray(v)[:, None] for k, v in batch.items()}  # [N, 1, T]: one row at a time

  def row_sum(p, one):
    return sft.token_nll_sums(nnx.merge(graphdef, p), one)

  row_nll, row_labels = jax.jit(jax.vmap(row_sum, in_axes=(None, 0)))(p0, rows)
  row_nll, row_labels = np.asarray(row_nll, np.float64), np.asarray(row_labels, np.float64)
  assert len(set(row_labels.tolist())) > 5  # ragged
  want = hf_trainer_objective(row_nll, row_labels, devices=8, accumulation=2)
  assert abs(float(metrics["loss"]) - want) < 1e-5
  row_grads = jax.jit(jax.vmap(jax.grad(lambda p, one: row_sum(p, one)[0]), in_axes=(None, 0)))(p0, rows)
  per_device = N // 8
  coef = np.asarray([1.0 / (8 * row_labels[(i // per_device) * per_device:(i // per_device + 1) * per_device].sum())
                     for i in range(N)])
  want_grads = jax.tree.map(lambda g: np.tensordot(coef, np.asarray(g, np.float64), axes=1), row_grads)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(want_grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b, a, atol=2e-6)
  # The global token mean differs on the same batch (devices' label counts are unequal).
  glob = jax.jit(sft.make_train_step(lay.graphdef, tx, lambda s: 1.0, N // 2, shards=8))
  state = state_lib.init_state(Qwen2(cfg, rngs=nnx.Rngs(0)), tx, lay, 0)
  with jax.set_mesh(mesh):
    _, m_glob = glob(state, {k: jnp.asarray(v) for k, v in batch.items()})
  assert abs(float(m_glob["loss"]) - row_nll.sum() / row_labels.sum()) < 1e-5
  assert abs(float(m_glob["loss"]) - want) > 1e-4


def _examples(rng, lengths):
  out = []
  for n in lengths:
    start = rng.integers(1, n - 1)  # ragged prompts: at least one label token each
    out.append({"tokens": rng.integers(3, 512, n).astype(np.int32),
                "loss_mask": (np.arange(n) >= start).astype(np.int32)})
  return out


@pytest.mark.slow
def test_sft_packed_per_device_normalisation_matches_hf_trainer():
  """packing='samples' on 8 devices: 16 examples packed longest-first into rows whose 8 shards include
  all-padding ones, each example weighted by its device's label count (the examples in draw order, 2 per
  device, as 2 accumulation micro-batches of 1): HF's loss and gradient. Then a last batch of 6 examples:
  the 2 groups left empty add nothing and the 6 others are averaged over 6 (not 8)."""
  cfg = F.tiny_config(tie_word_embeddings=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  T, most = 64, 16
  tx = optax.sgd(1.0)  # the update is minus the gradient
  lay = state_lib.layout(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = jax.jit(sft.make_train_step(lay.graphdef, tx, lambda s: 1.0, 8, shards=8,
                                     loss_norm="per_device_token_mean", loss_groups=8))
  graphdef, p0 = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def reference(p, alone, coef):
    """Each example alone on its own padded row: NLL sums and label counts, and the gradient of sum coef x NLL."""
    def weighted(p):
      nll, labels = jax.vmap(lambda one: sft.token_nll_sums(nnx.merge(graphdef, p), one))(alone)
      return jnp.sum(coef * nll), (nll, labels)
    return jax.grad(weighted, has_aux=True)(p)

  rng = np.random.default_rng(3)
  for lengths, devices, accumulation in (([40, 6, 22, 9, 30, 12, 5, 17, 26, 8, 11, 35, 7, 14, 20, 10], 8, 2),
                                         ([31, 9, 24, 6, 40, 13], 6, 1)):
    examples = _examples(rng, lengths)
    batch = pipeline.pack_samples(examples, T, row_multiple=8, loss_groups=8)
    shard_tokens = (batch["segment_ids"] > 0).reshape(8, -1).sum(axis=1)
    assert (shard_tokens == 0).any() and (shard_tokens > 0).sum() >= 2, shard_tokens  # all-padding shards
    assert len(np.unique(batch["sample_group"][batch["segment_ids"] > 0])) == devices
    state = state_lib.init_state(Qwen2(cfg, rngs=nnx.Rngs(0)), tx, lay, 0)
    params = jax.device_get(state.params)
    with jax.set_mesh(mesh):
      new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, jax.device_get(new.params))

    padded = examples + [{"tokens": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int32)}] * (most - len(lengths))
    alone = {k: jnp.asarray(np.stack([pipeline._pad(e, T, 0)[k] for e in padded]))[:, None]
             for k in pipeline.BATCH_KEYS}
    labels = pipeline.next_token_targets({k: np.asarray(v[:, 0]) for k, v in alone.items()})[1].sum(axis=1)
    labels = labels[:len(lengths)].astype(np.float64)
    per_device = len(lengths) // devices
    coef = [1.0 / (devices * labels[i // per_device * per_device:(i // per_device + 1) * per_device].sum())
            for i in range(len(lengths))]
    want_grads, (nll, counted) = reference(p0, alone, jnp.asarray(coef + [0.0] * (most - len(lengths)), jnp.float32))
    assert np.asarray(counted)[:len(lengths)].tolist() == labels.tolist()
    want = hf_trainer_objective(np.asarray(nll, np.float64)[:len(lengths)], labels, devices=devices,
                                accumulation=accumulation)
    assert abs(float(metrics["loss"]) - want) < 1e-5, (float(metrics["loss"]), want)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(want_grads)), jax.tree.leaves(grads)):
      np.testing.assert_allclose(b, a, atol=2e-6)


def test_warmup_is_ceil_of_ratio_times_steps():
  from rrjax.train import optim
  from rrjax.train.config import OptimizerConfig
  c = OptimizerConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine")
  assert optim.warmup_steps(c, 45) == 5 and optim.warmup_steps(c, 41) == 5 and optim.warmup_steps(c, 40) == 4
  lr = optim.schedule(c, 45)
  assert float(lr(4)) < 1.0 and abs(float(lr(5)) - 1.0) < 1e-6


# ---------------------------------------------------------------- verl 0.4.0 run length and lr schedule


def verl_lr_factor(step, *, style, warmup_ratio, total_steps, min_lr_ratio=0.0, num_cycles=0.5):
  """fsdp_workers.py:352-367 (warmup int(ratio x total)) with torch_functional.py:496-501 (cosine) and
  :523-526 (constant): the LambdaLR factor at scheduler step `step`."""
  warmup = int(warmup_ratio * total_steps)
  if style == "constant":
    return float(step) / float(max(1.0, warmup)) if step < warmup else 1.0
  if step < warmup:
    return min_lr_ratio + (1.0 - min_lr_ratio) * (float(step) / float(max(1, warmup)))
  progress = float(step - warmup) / float(max(1, total_steps - warmup))
  x = np.cos(np.pi * float(num_cycles) * 2.0 * progress)
  return max(min_lr_ratio, x * (1 - min_lr_ratio) * 0.5 + (1 + min_lr_ratio) * 0.5)


def test_grpo_runs_one_epoch_of_kept_rows_with_verls_schedule(tmp_path, capsys):
  """verl's total_epochs=1: steps = kept rows // prompts per step (overlong prompts dropped first), printed.
  The lr of every update is verl's scheduler at the update's rollout step (one scheduler step per rollout step,
  warmup int(ratio x steps)); 'update' counts updates with HF's ceil warmup instead."""
  from rrjax.train.config import OptimizerConfig, RLDataConfig, TrainConfig
  tok = F.small_tokenizer(tmp_path / "tok")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rows = [rl_data.RLRow(prompt=" ".join(["passage"] * 300) if i in (3, 17) else f"cost {i}",
                        gold_ranking="[1] > [2]", initial_list=("a", "b"), final_list=("a", "b"),
                        relevant_docids=("a",), qid=str(i)) for i in range(41)]
  rl_data.write_rl_jsonl(tmp_path / "rl.jsonl", rows)
  for style, ratio, floor in (("constant", 0.15, 0.0), ("cosine", 0.3, 0.1)):
    opt = OptimizerConfig(lr=2.0, schedule=style, warmup_ratio=ratio, final_lr_ratio=floor)
    g = GRPOConfig(rollouts_per_prompt=2, updates_per_step=2, max_prompt_tokens=64, overlong_prompts="drop")
    config = TrainConfig(trainer="grpo", model=F.tiny_config(), batch_size=4, num_steps=0, num_epochs=1, grpo=g,
                         optimizer=opt, rl_data=RLDataConfig(train_files=(str(tmp_path / "rl.jsonl"),)))
    trainer = grpo.GRPOTrainer(config, mesh, config.model, tok)
    assert trainer.total_steps == 39 // 4 == 9
    assert "39 RL rows kept, 9 steps of 4 prompts per epoch x 1 epochs" in capsys.readouterr().out
    got = [float(trainer.lr_schedule(u)) for u in range(2 * 9)]
    want = [2.0 * verl_lr_factor(u // 2, style=style, warmup_ratio=ratio, total_steps=9, min_lr_ratio=floor)
            for u in range(2 * 9)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == got[1] and got[2] == got[3]  # a rollout step's updates share one lr
  # 'update': 18 updates, warmup ceil(0.15 x 18) = 3 (verl's rule would give int(0.15 x 9) = 1 rollout step).
  opt = OptimizerConfig(lr=2.0, schedule="constant", warmup_ratio=0.15)
  config = TrainConfig(trainer="grpo", model=F.tiny_config(), batch_size=4, num_steps=0, optimizer=opt,
                       grpo=GRPOConfig(rollouts_per_prompt=2, max_prompt_tokens=64, overlong_prompts="drop",
                                       schedule_unit="update"),
                       rl_data=RLDataConfig(train_files=(str(tmp_path / "rl.jsonl"),)))
  trainer = grpo.GRPOTrainer(config, mesh, config.model, tok)
  np.testing.assert_allclose([float(trainer.lr_schedule(u)) for u in range(4)], [0.0, 2 / 3, 4 / 3, 2.0], rtol=1e-6)
  with pytest.raises(ValueError, match=r"GRPOConfig.schedule_unit: 'epoch' is not 'rollout_step' or 'update'"):
    grpo.GRPOTrainer(dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, schedule_unit="epoch")), mesh,
                     config.model, tok)


# ---------------------------------------------------------------- RL prompts as verl renders them


def test_parquet_messages_render_with_the_chat_template_only(tmp_path):
  """Curly quotes and full-width digits stay as they are (ftfy would change both); the text is exactly
  transformers' apply_chat_template of the row's messages."""
  import ftfy
  import transformers
  from rrjax import tokenizer as tokenizer_lib
  hf = transformers.AutoTokenizer.from_pretrained(str(ROOT / "rrjax" / "assets" / "qwen2.5-tokenizer"))
  messages = [{"role": "system", "content": "You are RankLLM."},
              {"role": "user", "content": "Query: “why” ２０２４\n[1] it’s ＡＢＣ\n[2] ＂quoted＂ text"}]
  want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert ftfy.fix_text(want) != want
  row = rl_data.RLRow(prompt="unused", gold_ranking="[2] > [1]", initial_list=("a", "b"), final_list=("b", "a"),
                      relevant_docids=("b",), qid="q", messages=tuple((m["role"], m["content"]) for m in messages))
  rl_data.write_rl_parquet(tmp_path / "rl.parquet", [row])
  (back,) = rl_data.read_rl(tmp_path / "rl.parquet", tokenizer=tokenizer_lib.load())
  assert back.prompt == want


def test_overlong_prompts_are_dropped_and_counted(tmp_path):
  from rrjax.train.config import TrainConfig
  tok = F.small_tokenizer(tmp_path / "tok")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  rows = [rl_data.RLRow(prompt=p, gold_ranking="[1] > [2]", initial_list=("a", "b"), final_list=("a", "b"),
                        relevant_docids=("a",), qid=str(i))
          for i, p in enumerate(["cost 1", " ".join(["passage"] * 300), "cost 2", "cost 3"])]
  config = TrainConfig(trainer="grpo", model=F.tiny_config(), batch_size=1, num_steps=1,
                       grpo=GRPOConfig(rollouts_per_prompt=2, max_prompt_tokens=64, overlong_prompts="drop"))
  trainer = grpo.GRPOTrainer(config, mesh, config.model, tok, rows=rows)
  assert trainer.dropped_overlong == 1 and [r.qid for r in trainer.rows] == ["0", "2", "3"]


# ---------------------------------------------------------------- non-finite updates (verl's optimizer step)


def test_old_logprobs_recomputed_and_non_finite_updates_skipped(tmp_path):
  """Through the shared loop. Step 1's first update has ratio exactly 1 (old log-probs recomputed by the actor:
  nothing clipped, no KL to the old policy) and logs the rollout's drift from them. lr 1e30 with weight decay
  makes that update blow the weights up: every later gradient is not finite and is skipped (the run goes
  on, counting them), until max_consecutive_skips in a row stop it, naming the last good checkpoint."""
  from rrjax.train import __main__ as entry
  from rrjax.train.logger import read_metrics
  tok = F.small_tokenizer(tmp_path / "tok")
  rows = [rl_data.RLRow(prompt=tok.apply_chat_template([{"role": "user", "content": r["instruction"]}]),
                        gold_ranking="[1] > [2]", initial_list=("a", "b"), final_list=("a", "b"),
                        relevant_docids=("a",), qid=str(i)) for i, r in enumerate(F.sft_rows(8))]
  rl_data.write_rl_jsonl(tmp_path / "rl.jsonl", rows)
  params = F.gin_params(tmp_path / "run", tmp_path / "sft.json", tmp_path / "tok", **{
      "RLDataConfig.train_files": f"({str(tmp_path / 'rl.jsonl')!r},)", "TrainConfig.batch_size": 2,
      "GRPOConfig.rollouts_per_prompt": 8, "GRPOConfig.max_response_tokens": 8, "TrainConfig.num_steps": 6,
      "OptimizerConfig.lr": 1e30, "OptimizerConfig.weight_decay": 0.01, "CheckpointConfig.every_steps": 1,
      "CheckpointConfig.async_save": False,
      "TrainConfig.preflight": False, "TrainConfig.export_hf": False})
  config = entry.parse_config([str(ROOT / "configs" / "grpo" / "tiny_cpu.gin")], params)
  with pytest.raises(loop.TrainingDiverged, match=r"step 2: 3 updates in a row had a non-finite gradient norm "
                                                  r".*last good checkpoint is step 1"):
    loop.run(config, grpo.GRPOTrainer)
  (first,) = read_metrics(config.run_dir)
  assert first["skipped_updates"] == 1 and np.isfinite(first["loss"])  # update 1 applied, update 2 skipped
  assert first["lr"] == pytest.approx(1e30, rel=1e-6)
  assert first["clip_frac"] == 0 and abs(first["ppo_kl"]) < 1e-6  # the applied update's ratio is 1
  assert 0 <= first["rollout_probs_diff_mean"] <= first["rollout_probs_diff_max"] < 1e-3  # f32 on CPU
  assert first["entropy"] > 0
