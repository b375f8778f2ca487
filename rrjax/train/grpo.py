"""On-policy GRPO with ReasonRank's multi-view ranking reward (upstream: verl 0.4).

Each step: P prompts -> G rollouts each, sampled by `rrjax.generate` from the live policy (the same
parameters and mesh that train: no weight copy) -> rewards by `rrjax.ranking.batch_rewards` -> group
advantages (r - mean) / (unbiased std + 1e-6) -> `updates_per_step` optimizer updates, each on its own
slice of the rollouts, of the token-mean clipped surrogate (dual clip for negative advantages) plus
beta * low-variance KL (k3) to the frozen reference. Old log-probs are the rollout's. With LoRA the
reference is the base model (adapters off), so no second copy of the weights is kept; with beta = 0 no
reference is kept at all.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import decode
from rrjax import tokenizer as tokenizer_lib
from rrjax.data import rl as rl_data
from rrjax.model.qwen2 import Qwen2Config
from rrjax.ranking import reward as reward_lib
from rrjax.train import optim
from rrjax.train.config import GRPOConfig, TrainConfig
from rrjax.train.state import TrainState, apply_gradients


# ---------------------------------------------------------------- the math (pure, tested against NumPy)


def group_advantages(rewards_PxG: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(r - group mean) / (unbiased group std + eps); a group of one gets mean 0 and std 1, as in verl."""
  G = rewards_PxG.shape[1]
  if G == 1:
    return rewards_PxG
  mean = rewards_PxG.mean(axis=1, keepdims=True)
  std = rewards_PxG.std(axis=1, ddof=1, keepdims=True)
  return (rewards_PxG - mean) / (std + eps)


def masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, *, clip_low, clip_high, dual_clip):
  """verl's compute_policy_loss with loss_agg_mode token-mean. Returns (loss, clip fraction, lower-clip
  fraction, approx KL to the old policy)."""
  adv_BxT = adv_B[:, None]
  neg_kl = logp_BxT - old_logp_BxT
  ratio = jnp.exp(neg_kl)
  loss1 = -adv_BxT * ratio
  loss2 = -adv_BxT * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = jnp.maximum(loss1, loss2)
  loss3 = -adv_BxT * dual_clip
  dual = jnp.minimum(loss3, clipped)
  losses = jnp.where(adv_BxT < 0, dual, clipped)
  clipfrac = masked_mean((loss2 > loss1).astype(jnp.float32), mask_BxT)
  clipfrac_lower = masked_mean(((clipped > loss3) & (adv_BxT < 0)).astype(jnp.float32), mask_BxT)
  return masked_mean(losses, mask_BxT), clipfrac, clipfrac_lower, masked_mean(-neg_kl, mask_BxT)


def low_var_kl(logp_BxT, ref_logp_BxT):
  """k3 = exp(ref - logp) - (ref - logp) - 1, clamped as verl does."""
  kl = jnp.clip(ref_logp_BxT - logp_BxT, -20.0, 20.0)
  return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)


def token_logprobs(model, tokens_BxT, segment_ids_BxT, temperature: float = 1.0):
  """(log p of tokens[t] given tokens[<t] at positions 1..T-1, entropy there); shapes [B, T-1]."""
  positions = jnp.maximum(jnp.cumsum(segment_ids_BxT, axis=1) - 1, 0)
  logits = model(tokens_BxT, positions, segment_ids_BxT)[:, :-1] / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


# ---------------------------------------------------------------- the trainer


def _lora_off(params):
  return jax.tree.map(jnp.zeros_like, params)


class GRPOTrainer:
  """GRPO for the shared loop (rrjax.train.loop.run). `TrainConfig.batch_size` is prompts per step."""

  def __init__(self, config: TrainConfig, mesh: Mesh, model_cfg: Qwen2Config, tokenizer: tokenizer_lib.Tokenizer, *,
               rows=None):
    self.config, self.mesh, self.model_cfg = config, mesh, model_cfg
    self.grpo = config.grpo
    data = config.rl_data
    self.tokenizer = tokenizer
    if rows is None:
      if not data.train_files:
        raise ValueError("RLDataConfig.train_files: no RL rows configured")
      rows = [r for f in data.train_files for r in rl_data.read_rl(f, tokenizer=self.tokenizer)]
    if not rows:
      raise ValueError("GRPO: no RL rows")
    self.rows = list(rows)
    self.shuffle = data.shuffle
    g = self.grpo
    n_rollouts = config.batch_size * g.rollouts_per_prompt
    if n_rollouts % g.updates_per_step:
      raise ValueError(f"GRPOConfig.updates_per_step={g.updates_per_step} must divide the {n_rollouts} rollouts")
    per_epoch = len(self.rows) // config.batch_size
    self.total_steps = config.num_steps if config.num_steps > 0 else per_epoch * config.num_epochs
    if self.total_steps <= 0:
      raise ValueError(f"GRPO: {len(self.rows)} rows give no step of {config.batch_size} prompts")
    # verl counts the schedule in optimizer updates, not in rollout steps.
    self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, self.total_steps * g.updates_per_step)
    self.use_reference = g.kl_coef > 0
    self.lora = bool(config.lora.rank)
    self.ref_params = None

  # -- loop interface

  def data_iterator(self):
    ds = grain.MapDataset.range(len(self.rows))
    if self.shuffle:
      ds = ds.shuffle(seed=self.config.seed)
    ds = ds.repeat(None).batch(self.config.batch_size, drop_remainder=True)
    return iter(ds)

  def bind(self, lay) -> None:
    self.lay = lay
    self._update = jax.jit(make_update(lay.graphdef, self.tx, self.lr_schedule, self.grpo, self.lora),
                           donate_argnums=(0,))
    if self.use_reference and not self.lora:
      from rrjax.train import loop  # the reference is the starting policy, rebuilt exactly
      model = loop.build_model(self.config, self.model_cfg, self.mesh)
      self.ref_params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lay.shardings.params)

  def step(self, state: TrainState, batch_ids) -> tuple[TrainState, dict[str, Any]]:
    g, c = self.grpo, self.config
    rows = [self.rows[int(i)] for i in np.asarray(batch_ids)]
    step_no = int(jax.device_get(state.step))
    model = nnx.merge(self.lay.graphdef, state.params, state.frozen)
    prompts = [self.tokenizer.encode(r.prompt) for r in rows]
    rollout_prompts = [p for p in prompts for _ in range(g.rollouts_per_prompt)]
    # One prefill per prompt into its G slots; the engine's cache is freed when generate returns, before the update.
    gen = decode.generate(model, prompts, num_samples=g.rollouts_per_prompt, max_new_tokens=g.max_response_tokens,
                          temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=c.seed * 1_000_003 + step_no,
                          stop_ids=self.tokenizer.stop_ids, mesh=self.mesh, batch_size=g.rollout_batch_size)
    texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
    per_rollout = [r for r in rows for _ in range(g.rollouts_per_prompt)]
    rewards = reward_lib.batch_rewards(texts, *rl_data.reward_inputs(per_rollout))
    adv = np.asarray(group_advantages(jnp.asarray(rewards.reward.reshape(len(rows), g.rollouts_per_prompt))))
    batch = self._sequences(rollout_prompts, gen, adv.reshape(-1))
    n_mini = g.updates_per_step
    size = len(rollout_prompts) // n_mini
    metrics_sum: dict[str, float] = {}
    with jax.set_mesh(self.mesh):
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      spec = PartitionSpec(("data", "fsdp")) if size % shards == 0 else PartitionSpec()
      for m in range(n_mini):
        mini = jax.device_put({k: v[m * size:(m + 1) * size] for k, v in batch.items()},
                              NamedSharding(self.mesh, spec))
        state, metrics = self._update(state, self.ref_params, mini)
        for k, v in jax.device_get(metrics).items():
          metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / n_mini
    lengths = np.asarray(gen.lengths, np.float32)
    out = {**metrics_sum,
           "reward_mean": float(rewards.reward.mean()), "reward_std": float(rewards.reward.std()),
           "format_fail_rate": float(1.0 - rewards.format_ok.mean()), "answer_ok_rate": float(rewards.answer_ok.mean()),
           "ndcg10": float(rewards.ndcg10.mean()), "recall10": float(rewards.recall10.mean()),
           "rbo": float(rewards.rbo.mean()), "response_length": float(lengths.mean()),
           "seq_tokens": float(lengths.sum() + sum(len(p) for p in rollout_prompts))}
    return state, out

  # -- internals

  def _sequences(self, prompts: Sequence[list[int]], gen: decode.Generation, adv_N: np.ndarray):
    """Right-padded prompt+response rows with the response mask, rollout log-probs and advantages, all
    aligned to next-token positions 1..T-1 (so arrays over positions are [N, T-1])."""
    lengths = [len(p) + len(t) for p, t in zip(prompts, gen.tokens)]
    T = int(math.ceil(max(lengths) / self.grpo.length_bucket) * self.grpo.length_bucket)
    N = len(prompts)
    tokens = np.zeros((N, T), np.int32)
    segments = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T - 1), np.float32)
    old_logp = np.zeros((N, T - 1), np.float32)
    for i, (p, t, lp) in enumerate(zip(prompts, gen.tokens, gen.logprobs)):
      n = len(p) + len(t)
      tokens[i, :n] = p + t
      segments[i, :n] = 1
      mask[i, len(p) - 1:n - 1] = 1.0  # position t-1 predicts response token t
      old_logp[i, len(p) - 1:n - 1] = lp
    return {"tokens": tokens, "segment_ids": segments, "mask": mask, "old_logp": old_logp,
            "adv": adv_N.astype(np.float32)}


def make_update(graphdef, tx, lr_schedule, g: GRPOConfig, lora: bool):
  """One optimizer update on a mini-batch of rollouts: the clipped surrogate plus beta * k3 KL."""

  def loss_fn(params, frozen, ref_params, mb):
    model = nnx.merge(graphdef, params, frozen)
    logp, entropy = token_logprobs(model, mb["tokens"], mb["segment_ids"], g.temperature)
    pg, clipfrac, clipfrac_lower, ppo_kl = policy_loss(
        logp, mb["old_logp"], mb["adv"], mb["mask"], clip_low=g.clip_ratio_low, clip_high=g.clip_ratio_high,
        dual_clip=g.dual_clip)
    kl = jnp.float32(0.0)
    if g.kl_coef > 0:
      if lora:  # the reference is the frozen base: the same model with its adapters zeroed
        ref_model = nnx.merge(graphdef, _lora_off(params), frozen)
      else:
        ref_model = nnx.merge(graphdef, ref_params, frozen)
      ref_logp, _ = token_logprobs(ref_model, mb["tokens"], mb["segment_ids"], g.temperature)
      kl = masked_mean(low_var_kl(logp, jax.lax.stop_gradient(ref_logp)), mb["mask"])
    loss = pg + g.kl_coef * kl
    aux = {"pg_loss": pg, "kl": kl, "clip_frac": clipfrac, "clip_frac_lower": clipfrac_lower, "ppo_kl": ppo_kl,
           "entropy": masked_mean(entropy, mb["mask"])}
    return loss, aux

  def update(state: TrainState, ref_params, mb):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen, ref_params, mb)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step), **aux}
    return apply_gradients(state, grads, tx), metrics

  return update
