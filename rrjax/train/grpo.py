"""On-policy GRPO with ReasonRank's multi-view ranking reward (upstream: verl 0.4).

Each step, as verl structures it:
  1. P prompts -> G rollouts each, sampled by `rrjax.generate` from the live policy (the same parameters and
     mesh that train: no weight copy);
  2. rewards by `rrjax.ranking.batch_rewards` -> group advantages (r - mean) / (unbiased std + 1e-6);
  3. one no-gradient pass in micro-batches: the actor's log-probs before any update (the old log-probs, so
     the first update's ratio is exactly 1; the rollout's are logged against them as drift), the frozen
     reference's (with LoRA: the base, adapters off; with beta = 0 none) and the entropy (logged only);
  4. `updates_per_step` optimizer updates, each on its own slice of the rollouts and each a scan over
     micro-batches accumulating loss sums and gradients, of the clipped surrogate (dual clip for negative
     advantages) plus beta * low-variance KL (k3), aggregated by `GRPOConfig.loss_agg`.
Log-probs are computed only over response positions, a chunk at a time (rrjax.train.logprobs). Rows are
laid out as verl's: the prompt left-padded to P slots, the response right-padded to R slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import decode
from rrjax import tokenizer as tokenizer_lib
from rrjax.data import rl as rl_data
from rrjax.engine.config import EngineConfig
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import Qwen2Config
from rrjax.ranking import reward as reward_lib
from rrjax.sampling import Sampling
from rrjax.train import logprobs, optim
from rrjax import aot, cost, hardware
from rrjax.train.config import GRPOConfig, TrainConfig
from rrjax.train.state import TrainState, apply_gradients, micro_batches, scan_gradients, unmicro_batches

LOSS_AGG = ("seq_mean_token_mean", "token_mean")
BATCH_AXES = ("data", "fsdp")


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


def policy_terms(logp_BxT, old_logp_BxT, adv_B, *, clip_low, clip_high, dual_clip):
  """verl's compute_policy_loss before aggregation: per-token (loss, clipped?, lower-clipped?, old - new)."""
  adv_BxT = adv_B[:, None]
  neg_kl = logp_BxT - old_logp_BxT
  ratio = jnp.exp(neg_kl)
  loss1 = -adv_BxT * ratio
  loss2 = -adv_BxT * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = jnp.maximum(loss1, loss2)
  loss3 = -adv_BxT * dual_clip
  dual = jnp.minimum(loss3, clipped)
  losses = jnp.where(adv_BxT < 0, dual, clipped)
  return (losses, (loss2 > loss1).astype(jnp.float32), ((clipped > loss3) & (adv_BxT < 0)).astype(jnp.float32),
          -neg_kl)


def policy_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, *, clip_low, clip_high, dual_clip):
  """verl's compute_policy_loss with loss_agg_mode token-mean. Returns (loss, clip fraction, lower-clip
  fraction, approx KL to the old policy)."""
  losses, clipped, lower, kl = policy_terms(logp_BxT, old_logp_BxT, adv_B, clip_low=clip_low, clip_high=clip_high,
                                            dual_clip=dual_clip)
  return tuple(masked_mean(x, mask_BxT) for x in (losses, clipped, lower, kl))


def low_var_kl(logp_BxT, ref_logp_BxT):
  """k3 = exp(ref - logp) - (ref - logp) - 1 clamped to [-10, 10], verl 0.4.0's (core_algos.py:594-598). The
  log-ratio is clamped to [-20, 20] first (as verl 0.4.1 does): no value changes (beyond 20 either way k3 > 10),
  and exp stays finite, so the clamped-away gradient is 0, not 0 x inf."""
  kl = jnp.clip(ref_logp_BxT - logp_BxT, -20.0, 20.0)
  return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)


def _bad_loss_agg(name: str) -> ValueError:
  return ValueError(f"GRPOConfig.loss_agg: {name!r} is not one of {LOSS_AGG}")


def loss_weights(mask_BxT, loss_agg: str):
  """Per-token weights whose weighted sum of per-token losses is the mini-batch loss (see GRPOConfig)."""
  mask_BxT = mask_BxT.astype(jnp.float32)
  if loss_agg == "token_mean":
    return mask_BxT / jnp.maximum(jnp.sum(mask_BxT), 1.0)
  if loss_agg == "seq_mean_token_mean":
    per_seq_B = jnp.maximum(jnp.sum(mask_BxT, axis=1, keepdims=True), 1.0)
    return mask_BxT / per_seq_B / mask_BxT.shape[0]
  raise _bad_loss_agg(loss_agg)


def token_logprobs(model, tokens_BxT, segment_ids_BxT, temperature: float = 1.0, chunk: int = 0):
  """(log p of tokens[t] given tokens[<t] at positions 1..T-1, entropy there); shapes [B, T-1]."""
  positions = jnp.maximum(jnp.cumsum(segment_ids_BxT, axis=1) - 1, 0)
  hidden, _ = model.hidden_states(tokens_BxT, positions, segment_ids_BxT)
  return logprobs.token_logprobs(model, hidden[:, :-1], tokens_BxT[:, 1:], chunk=chunk, temperature=temperature,
                                 entropy=True)


def response_logprobs(model, tokens_BxT, segment_ids_BxT, response_len: int, *, temperature: float = 1.0,
                      chunk: int = 0, entropy: bool = False):
  """Log-probs (and entropies) of the last `response_len` slots only: rows are a left-padded prompt of
  P = T - R slots then the response, so slot P - 1 + r predicts response token r. [B, R] each."""
  T = tokens_BxT.shape[1]
  P = T - response_len
  positions = jnp.maximum(jnp.cumsum(segment_ids_BxT, axis=1) - 1, 0)
  hidden, _ = model.hidden_states(tokens_BxT, positions, segment_ids_BxT)
  return logprobs.token_logprobs(model, hidden[:, P - 1:T - 1], tokens_BxT[:, P:], chunk=chunk,
                                 temperature=temperature, entropy=entropy)


# ---------------------------------------------------------------- the programs


def _lora_off(params):
  return jax.tree.map(jnp.zeros_like, params)


def weighted_terms(logp_BxR, mb, g: GRPOConfig):
  """(loss, sums for the metrics) of rollouts whose per-token loss weights are mb["weights"] (`loss_weights`
  of their mini-batch): the clipped surrogate plus kl_coef x k3 KL to mb["ref_logp"], each aggregated by the
  weights. Summed over micro-batches it is the mini-batch's loss."""
  pg, clipped, lower, ppo_kl = policy_terms(logp_BxR, mb["old_logp"], mb["adv"], clip_low=g.clip_ratio_low,
                                            clip_high=g.clip_ratio_high, dual_clip=g.dual_clip)
  w, m = mb["weights"], mb["mask"]
  pg_loss = jnp.sum(w * pg)
  kl = jnp.sum(w * low_var_kl(logp_BxR, mb["ref_logp"])) if g.kl_coef > 0 else jnp.float32(0.0)
  aux = {"pg_loss": pg_loss, "kl": kl, "clip_frac": jnp.sum(m * clipped), "clip_frac_lower": jnp.sum(m * lower),
         "ppo_kl": jnp.sum(m * ppo_kl), "tokens": jnp.sum(m)}
  return pg_loss + g.kl_coef * kl, aux


def minibatch_loss(logp_BxR, old_logp_BxR, ref_logp_BxR, adv_B, mask_BxR, g: GRPOConfig):
  """The loss of one update's mini-batch from its log-probs (what `make_update` differentiates)."""
  mb = {"old_logp": old_logp_BxR, "ref_logp": ref_logp_BxR, "adv": adv_B, "mask": mask_BxR,
        "weights": loss_weights(mask_BxR, g.loss_agg)}
  return weighted_terms(logp_BxR, mb, g)[0]


def make_logprob_pass(graphdef, g: GRPOConfig, *, lora: bool, micro_rows: int, shards: int, chunk: int):
  """(params, frozen, ref_params, batch) -> {"old_logp", "ref_logp" (with a KL term), "entropy_sum"}: the
  no-gradient pass over every rollout, `micro_rows` sequences (all devices) at a time."""

  def run(params, frozen, ref_params, batch):
    R = batch["mask"].shape[1]
    steps = batch["tokens"].shape[0] // micro_rows
    micro = micro_batches({"tokens": batch["tokens"], "segment_ids": batch["segment_ids"], "mask": batch["mask"]},
                          steps, shards if steps > 1 else 1)

    def one(_, mb):
      model = nnx.merge(graphdef, params, frozen)
      old, ent = response_logprobs(model, mb["tokens"], mb["segment_ids"], R, temperature=g.temperature,
                                   chunk=chunk, entropy=True)
      out = {"old_logp": old, "entropy_sum": jnp.sum(ent * mb["mask"])}
      if g.kl_coef > 0:  # the reference: the frozen base with LoRA (adapters zeroed), else its own weights
        ref_model = nnx.merge(graphdef, _lora_off(params), frozen) if lora else nnx.merge(graphdef, ref_params, frozen)
        out["ref_logp"] = response_logprobs(ref_model, mb["tokens"], mb["segment_ids"], R, temperature=g.temperature,
                                            chunk=chunk)[0]
      return None, out

    _, out = jax.lax.scan(one, None, micro)
    entropy_sum = jnp.sum(out.pop("entropy_sum"))
    out = unmicro_batches(out, shards if steps > 1 else 1)
    out["entropy"] = entropy_sum / jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    return out

  return run


def make_update(graphdef, tx, lr_schedule, g: GRPOConfig, *, micro_rows: int, shards: int = 1, chunk: int = 0):
  """One optimizer update on a mini-batch of rollouts (tokens, segment_ids, mask, old_logp, ref_logp, adv): a
  scan over micro-batches of `micro_rows` sequences summing the weighted per-token losses and their gradient.
  The reference enters only as its precomputed log-probs."""
  if g.loss_agg not in LOSS_AGG:
    raise _bad_loss_agg(g.loss_agg)

  def terms(params, frozen, mb):
    model = nnx.merge(graphdef, params, frozen)
    R = mb["mask"].shape[1]
    logp, _ = response_logprobs(model, mb["tokens"], mb["segment_ids"], R, temperature=g.temperature, chunk=chunk)
    return weighted_terms(logp, mb, g)

  def update(state: TrainState, mb):
    mb = dict(mb, weights=loss_weights(mb["mask"], g.loss_agg))
    if g.kl_coef <= 0:
      mb["ref_logp"] = mb["old_logp"]  # unused
    steps = mb["tokens"].shape[0] // micro_rows
    micro = micro_batches(mb, steps, shards if steps > 1 else 1)
    loss, aux, grads = scan_gradients(lambda p, x: terms(p, state.frozen, x), state.params, micro)
    tokens = jnp.maximum(aux.pop("tokens"), 1.0)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
               "pg_loss": aux["pg_loss"], "kl": aux["kl"], "clip_frac": aux["clip_frac"] / tokens,
               "clip_frac_lower": aux["clip_frac_lower"] / tokens, "ppo_kl": aux["ppo_kl"] / tokens}
    # verl's optimizer step: a non-finite gradient norm zeroes the gradient and takes no step (the parameters
    # and the optimizer state stay); the learning-rate schedule still advances.
    ok = jnp.isfinite(grad_norm)
    new = apply_gradients(state, grads, tx)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return TrainState(new.step, keep(new.params, state.params), new.frozen, keep(new.opt_state, state.opt_state),
                      new.rng), metrics

  return update


def shape_bucket(n: int, cap: int) -> int:
  """Training lengths in few shapes: the decoder's half-octave buckets from 256 (multiples of 128, the TPU
  attention kernel's tile), at most `cap` rounded up to 128."""
  cap = -(-cap // 128) * 128
  return min(decode.bucket(max(n, 1), 256, 2), cap)


def balanced_partitions(seqlens: Sequence[int], k: int) -> list[list[int]]:
  """verl 0.4's get_seqlen_balanced_partitions(seqlens, k, equal_size=True) (utils/seqlen_balancing.py):
  Karmarkar-Karp's largest differencing into k partitions of equal count; each partition's indices sorted."""
  import heapq

  if len(seqlens) % k:
    raise ValueError(f"{len(seqlens)} sequences do not split into {k} equal partitions")

  class _Set:
    def __init__(self):
      self.sum, self.items = 0, []

    def add(self, idx, val):
      self.items.append((idx, val))
      self.sum += val

    def merge(self, other):
      for idx, val in other.items:
        self.add(idx, val)

    def __lt__(self, other):
      if self.sum != other.sum:
        return self.sum < other.sum
      if len(self.items) != len(other.items):
        return len(self.items) < len(other.items)
      return self.items < other.items

  class _State:
    def __init__(self, items):
      self.sets = [_Set() for _ in range(k)]
      for i, (idx, val) in enumerate(items):
        self.sets[i].add(idx, val)
      self.sets = sorted(self.sets, reverse=True)

    def merge(self, other):
      for i in range(k):
        self.sets[i].merge(other.sets[k - 1 - i])
      self.sets = sorted(self.sets, reverse=True)

    @property
    def spread(self):
      return self.sets[0].sum - self.sets[-1].sum

    def __lt__(self, other):  # a min-heap that pops the largest spread first
      if self.spread != other.spread:
        return self.spread > other.spread
      return self.sets[0] > other.sets[0]

  ordered = sorted((int(n), i) for i, n in enumerate(seqlens))
  heap = []
  for offset in range(0, len(ordered), k):
    heapq.heappush(heap, _State([(idx, n) for n, idx in ordered[offset:offset + k]]))
  while len(heap) > 1:
    first, second = heapq.heappop(heap), heapq.heappop(heap)
    first.merge(second)
    heapq.heappush(heap, first)
  return [sorted(idx for idx, _ in s.items) for s in heap[0].sets]


def minibatch_rows(seqlens: Sequence[int], shards: int, updates: int, balance: bool) -> list[np.ndarray]:
  """The rollout indices of each update's mini-batch, in device order (shard r's rows are block r). With
  `balance`, verl's layout: shard r holds balanced partition r, split into the updates in order; else the
  rollouts in contiguous slices."""
  n = len(seqlens)
  size = n // updates
  if not balance:
    return [np.arange(m * size, (m + 1) * size) for m in range(updates)]
  parts = balanced_partitions(seqlens, shards)
  per = size // shards
  return [np.concatenate([np.asarray(p[m * per:(m + 1) * per]) for p in parts]) for m in range(updates)]


# ---------------------------------------------------------------- the trainer


class GRPOTrainer:
  """GRPO for the shared loop (rrjax.train.loop.run). `TrainConfig.batch_size` is prompts per step.
  `compile_only` builds what preflight needs and reads no rows."""

  skips_non_finite = True  # a non-finite update is skipped here (and counted), not a reason for the loop to stop

  def __init__(self, config: TrainConfig, mesh: Mesh, model_cfg: Qwen2Config, tokenizer: tokenizer_lib.Tokenizer, *,
               rows=None, compile_only: bool = False):
    self.config, self.mesh, self.model_cfg = config, mesh, model_cfg
    self.grpo = g = config.grpo
    self.tokenizer = tokenizer
    self.compile_only = compile_only
    if g.loss_agg not in LOSS_AGG:
      raise _bad_loss_agg(g.loss_agg)
    if g.overlong_prompts not in ("error", "drop"):
      raise ValueError(f"GRPOConfig.overlong_prompts: {g.overlong_prompts!r} is not 'error' or 'drop'")
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.micro_rows = g.micro_batch_size * self.shards
    self.n_rollouts = n = config.batch_size * g.rollouts_per_prompt
    # The rollout engine, the same for every step and for preflight (generate plans it once per shape).
    self.rollout_engine = EngineConfig(slots=g.rollout_batch_size or n,
                                       sampling=Sampling(g.temperature, g.top_k, g.top_p))
    if n % g.updates_per_step:
      raise ValueError(f"GRPOConfig.updates_per_step={g.updates_per_step} must divide the {n} rollouts")
    if (n // g.updates_per_step) % self.micro_rows:
      raise ValueError(f"GRPOConfig.micro_batch_size={g.micro_batch_size}: {n // g.updates_per_step} rollouts per "
                       f"update are not a whole number of micro-batches of {g.micro_batch_size} x {self.shards} "
                       "data shards")
    if compile_only:
      self.rows, self.prompt_ids = [], []
      self.total_steps = max(config.num_steps, 1)
    else:
      self._load_rows(rows)
    # verl 0.4.0 steps its lr scheduler once per rollout step, after the step's updates (fsdp_workers.py:594), over
    # total_training_steps rollout steps with an int() warmup (:359); 'update' counts optimizer updates instead.
    if g.schedule_unit == "rollout_step":
      self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, self.total_steps, rule="verl",
                                                       updates_per_count=g.updates_per_step)
    elif g.schedule_unit == "update":
      self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, self.total_steps * g.updates_per_step)
    else:
      raise ValueError(f"GRPOConfig.schedule_unit: {g.schedule_unit!r} is not 'rollout_step' or 'update'")
    self.lora = bool(config.lora.rank)
    self.ref_params = None
    self.consecutive_skips = 0
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    self._executables: dict[tuple, object] = {}

  def _load_rows(self, rows) -> None:
    c, g = self.config, self.grpo
    if rows is None:
      if not c.rl_data.train_files:
        raise ValueError("RLDataConfig.train_files: no RL rows configured")
      rows = [r for f in c.rl_data.train_files for r in rl_data.read_rl(f, tokenizer=self.tokenizer)]
    if not rows:
      raise ValueError("GRPO: no RL rows")
    rows = list(rows)
    ids_all = self.tokenizer.encode_batch([r.prompt for r in rows])
    self.rows, self.prompt_ids, self.dropped_overlong = [], [], 0
    for r, ids in zip(rows, ids_all):
      if len(ids) <= g.max_prompt_tokens:
        self.rows.append(r)
        self.prompt_ids.append(ids)
      elif g.overlong_prompts == "drop":
        self.dropped_overlong += 1
      else:
        raise ValueError(f"{r.where or 'RL row ' + (r.qid or '?')}: the prompt has {len(ids)} tokens, more than "
                         f"GRPOConfig.max_prompt_tokens={g.max_prompt_tokens}")
    if self.dropped_overlong:
      print(f"rrjax.train: dropped {self.dropped_overlong} of {len(rows)} RL rows whose prompts are longer than "
            f"GRPOConfig.max_prompt_tokens={g.max_prompt_tokens}", flush=True)
    if not self.rows:
      raise ValueError(f"GRPO: every RL row's prompt is longer than GRPOConfig.max_prompt_tokens={g.max_prompt_tokens}")
    # verl: total_training_steps = len(train_dataloader) x total_epochs, the loader dropping the last partial
    # batch (ray_trainer.py:590, :567 at ReasonRank 06721fd).
    per_epoch = len(self.rows) // c.batch_size
    self.total_steps = c.num_steps if c.num_steps > 0 else per_epoch * c.num_epochs
    if self.total_steps <= 0:
      raise ValueError(f"GRPO: {len(self.rows)} rows give no step of {c.batch_size} prompts")
    if c.num_steps <= 0:
      print(f"rrjax.train: GRPO: {len(self.rows)} RL rows kept, {per_epoch} steps of {c.batch_size} prompts per epoch "
            f"x {c.num_epochs} epochs (TrainConfig.num_epochs) = {self.total_steps} steps", flush=True)

  # -- loop interface

  def data_iterator(self):
    import grain

    ds = grain.MapDataset.range(len(self.rows))
    if self.config.rl_data.shuffle:
      ds = ds.shuffle(seed=self.config.seed)
    ds = ds.repeat(None).batch(self.config.batch_size, drop_remainder=True)
    return iter(ds)

  def bind(self, lay) -> None:
    self.lay = lay
    g, chunk = self.grpo, self.config.loss_chunk_tokens
    self._pass = jax.jit(make_logprob_pass(lay.graphdef, g, lora=self.lora, micro_rows=self.micro_rows,
                                           shards=self.shards, chunk=chunk))
    self._update = jax.jit(make_update(lay.graphdef, self.tx, self.lr_schedule, g, micro_rows=self.micro_rows,
                                       shards=self.shards, chunk=chunk),
                           in_shardings=(lay.shardings, self.batch_sharding), out_shardings=(lay.shardings, None),
                           donate_argnums=(0,))
    if g.kl_coef > 0 and not self.lora and not self.compile_only:
      from rrjax.train import loop  # the reference is the starting policy, rebuilt exactly
      model = loop.build_model(self.config, self.model_cfg, self.mesh)
      self.ref_params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lay.shardings.params)

  # -- shapes and programs

  def _abstract_batch(self, n: int, P: int, R: int, *, update: bool) -> dict:
    arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
    out = {"tokens": arr((n, P + R), jnp.int32), "segment_ids": arr((n, P + R), jnp.int32),
           "mask": arr((n, R), jnp.float32)}
    if update:
      out.update(old_logp=arr((n, R), jnp.float32), adv=arr((n,), jnp.float32))
      if self.grpo.kl_coef > 0:
        out["ref_logp"] = arr((n, R), jnp.float32)
    return out

  def _ref_abstract(self):
    return self.lay.abstract.params if self.grpo.kl_coef > 0 and not self.lora else None

  def _executable(self, name: str, P: int, R: int):
    """The compiled pass or update for prompt/response slots (P, R), compiled on first use."""
    key = (name, P, R)
    if key not in self._executables:
      with jax.set_mesh(self.mesh):
        if name == "logprob_pass":
          args = (self.lay.abstract.params, self.lay.abstract.frozen, self._ref_abstract(),
                  self._abstract_batch(self.n_rollouts, P, R, update=False))
          self._executables[key] = self._pass.lower(*args).compile()
        else:
          mini = self.n_rollouts // self.grpo.updates_per_step
          self._executables[key] = self._update.lower(self.lay.abstract, self._abstract_batch(
              mini, P, R, update=True)).compile()
    return self._executables[key]

  def programs(self, hbm_bytes: int | None = None) -> list[aot.Program]:
    """Every program of a step at the largest shapes the recipe allows (prompt = max_prompt_tokens); the
    rollout engine planned, as the run plans it, for `hbm_bytes` per device less the state resident meanwhile."""
    g, lay, cfg = self.grpo, self.lay, self.model_cfg
    P, R = shape_bucket(g.max_prompt_tokens, g.max_prompt_tokens), shape_bucket(g.max_response_tokens,
                                                                                 g.max_response_tokens)
    ref = self._ref_abstract()
    state_bytes = {k: aot.device_bytes(v) for k, v in lay.abstract._asdict().items()}
    ref_bytes = aot.device_bytes(ref) if ref is not None else 0
    full = self._abstract_batch(self.n_rollouts, P, R, update=True)
    kernel = attention_lib.kernel_for(cfg.attention, P + R, cfg.dtype, cfg.head_dim)
    abstract_model = nnx.merge(lay.graphdef, lay.abstract.params, lay.abstract.frozen)
    out = []
    lora = bool(cfg.lora.rank)
    for name, fn, args in decode.programs(
        abstract_model, self.config.batch_size, g.max_prompt_tokens, num_samples=g.rollouts_per_prompt,
        max_new_tokens=g.max_response_tokens, engine=self.rollout_engine, stop_ids=self.tokenizer.stop_ids,
        mesh=self.mesh, memory_limit_bytes=hbm_bytes and hbm_bytes - state_bytes["opt_state"] - ref_bytes):
      prefill_kernel = None
      if name == "rollout_prefill":  # the prompt attends to itself; decode steps use the cache path
        prefill_kernel = attention_lib.kernel_for(cfg.attention, args[1].shape[1], cfg.dtype, cfg.head_dim)
      out.append(aot.Program(name, fn, args, state_bytes["opt_state"] + ref_bytes, prefill_kernel))
    # Runs per step, at the recipe's longest responses: every prompt prefilled once (G per call), every rollout
    # decoded R steps in slots of the decode program (a step's cost is one iteration of its loop).
    shapes = {p.name: p.args for p in out}
    group = shapes["rollout_prefill"][1].shape[0]
    slots = int(shapes["rollout_decode"][2].lengths_B.shape[0])
    prefills = -(-self.config.batch_size // group)
    calls = {"rollout_prefill": prefills, "rollout_insert": prefills,
             "rollout_decode": -(-self.n_rollouts // slots) * g.max_response_tokens}
    out = [dataclasses.replace(p, work=cost.engine_work(p.name, p.args, cfg, context=P + R // 2,
                                                        new_tokens=R, calls=calls[p.name])) for p in out]
    out.append(aot.Program(
        "logprob_pass", self._pass, (lay.abstract.params, lay.abstract.frozen, ref,
                                     self._abstract_batch(self.n_rollouts, P, R, update=False)),
        state_bytes["opt_state"], kernel,
        cost.Work(cfg, "forward", self.n_rollouts, P + R, passes=2 if g.kl_coef > 0 else 1, logit_tokens=R)))
    mini = self.n_rollouts // g.updates_per_step
    out.append(aot.Program(
        "update", self._update, (lay.abstract, self._abstract_batch(mini, P, R, update=True)),
        ref_bytes + aot.device_bytes(full), kernel,
        cost.Work(cfg, "train", mini, P + R, logit_tokens=R, frozen_base=lora, calls=g.updates_per_step)))
    return out

  def tokens_per_step(self) -> int:
    """Rollout positions (prompt + response) one step trains on, at the longest prompts and responses."""
    return self.n_rollouts * (self.grpo.max_prompt_tokens + self.grpo.max_response_tokens)

  def adopt(self, program: aot.Program, compiled) -> None:
    """Keeps a preflight-compiled pass or update for its shapes, so the run does not compile it again."""
    if program.name in ("logprob_pass", "update"):
      batch = program.args[-1]
      R = batch["mask"].shape[1]
      self._executables[(program.name, batch["tokens"].shape[1] - R, R)] = compiled

  # -- one step

  def _rollout_budget(self, state: TrainState) -> int | None:
    """Per-device bytes the rollout engine may plan for: the devices' memory less the optimizer state and the
    reference weights that stay resident (None on CPU, where the engine reads the host's available memory)."""
    limit = hardware.device_memory_limit(list(self.mesh.devices.flat))
    return limit and limit - aot.device_bytes(state.opt_state) - aot.device_bytes(self.ref_params)

  def step(self, state: TrainState, batch_ids) -> tuple[TrainState, dict[str, Any]]:
    g, c = self.grpo, self.config
    ids = [int(i) for i in np.asarray(batch_ids)]
    rows = [self.rows[i] for i in ids]
    step_no = int(jax.device_get(state.step))
    model = nnx.merge(self.lay.graphdef, state.params, state.frozen)
    prompts = [self.prompt_ids[i] for i in ids]
    rollout_prompts = [p for p in prompts for _ in range(g.rollouts_per_prompt)]
    # One prefill per prompt into its G slots; the engine's cache is freed when generate returns, before the update.
    gen = decode.generate(model, prompts, num_samples=g.rollouts_per_prompt, max_new_tokens=g.max_response_tokens,
                          temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=c.seed * 1_000_003 + step_no,
                          stop_ids=self.tokenizer.stop_ids, mesh=self.mesh, engine=self.rollout_engine,
                          memory_limit_bytes=self._rollout_budget(state))
    texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
    per_rollout = [r for r in rows for _ in range(g.rollouts_per_prompt)]
    rewards = reward_lib.batch_rewards(texts, *rl_data.reward_inputs(per_rollout))
    adv = np.asarray(group_advantages(jnp.asarray(rewards.reward.reshape(len(rows), g.rollouts_per_prompt))))
    batch, rollout_logp = self._sequences(rollout_prompts, gen, adv.reshape(-1))
    P, R = batch["tokens"].shape[1] - batch["mask"].shape[1], batch["mask"].shape[1]
    put = lambda tree: jax.device_put(tree, self.batch_sharding)
    with jax.set_mesh(self.mesh):
      passed = self._executable("logprob_pass", P, R)(
          state.params, state.frozen, self.ref_params,
          put({k: batch[k] for k in ("tokens", "segment_ids", "mask")}))
      passed = jax.device_get(passed)
    batch["old_logp"] = np.asarray(passed["old_logp"], np.float32)
    if g.kl_coef > 0:
      batch["ref_logp"] = np.asarray(passed["ref_logp"], np.float32)
    mask = batch["mask"] > 0
    drift = np.abs(np.exp(batch["old_logp"]) - np.exp(rollout_logp))[mask]
    seqlens = batch["segment_ids"].sum(axis=1)
    per_update = []
    with jax.set_mesh(self.mesh):
      update = self._executable("update", P, R)
      for rows_m in minibatch_rows(seqlens, self.shards, g.updates_per_step, g.balance_batch):
        state, metrics = update(state, put({k: v[rows_m] for k, v in batch.items()}))
        per_update.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    out = self._update_metrics(per_update)
    lengths = np.asarray(gen.lengths, np.float32)
    out = {**out, "entropy": float(passed["entropy"]),
           "rollout_probs_diff_mean": float(drift.mean()) if drift.size else 0.0,
           "rollout_probs_diff_max": float(drift.max()) if drift.size else 0.0,
           "reward_mean": float(rewards.reward.mean()), "reward_std": float(rewards.reward.std()),
           "format_fail_rate": float(1.0 - rewards.format_ok.mean()), "answer_ok_rate": float(rewards.answer_ok.mean()),
           "ndcg10": float(rewards.ndcg10.mean()), "recall10": float(rewards.recall10.mean()),
           "rbo": float(rewards.rbo.mean()), "response_length": float(lengths.mean()),
           "seq_tokens": float(lengths.sum() + sum(len(p) for p in rollout_prompts))}
    return state, out

  # -- internals

  def _update_metrics(self, per_update: list[dict[str, float]]) -> dict[str, float]:
    """Means over the applied updates (a skipped one's loss is not finite); counts the skipped ones and stops
    the run after GRPOConfig.max_consecutive_skips in a row."""
    applied = [m for m in per_update if not m["skipped"]]
    for m in per_update:
      self.consecutive_skips = self.consecutive_skips + 1 if m["skipped"] else 0
      if self.consecutive_skips >= self.grpo.max_consecutive_skips:
        from rrjax.train.loop import TrainingDiverged
        raise TrainingDiverged(f"{self.consecutive_skips} updates in a row had a non-finite gradient norm "
                               f"(GRPOConfig.max_consecutive_skips={self.grpo.max_consecutive_skips})")
    keys = [k for k in per_update[0] if k not in ("skipped", "lr")]
    out = {k: float(np.mean([m[k] for m in applied])) if applied else float("nan") for k in keys}
    out["lr"] = float(np.mean([m["lr"] for m in per_update]))  # the schedule advances either way
    out["skipped_updates"] = float(len(per_update) - len(applied))
    return out

  def _sequences(self, prompts: Sequence[list[int]], gen: decode.Generation, adv_N: np.ndarray):
    """verl's layout: each prompt left-padded to P slots, its response right-padded to R slots (P, R from
    `shape_bucket`); the response mask covers the generated tokens (the stop token included). Returns the
    batch and the rollout's log-probs [N, R]."""
    g = self.grpo
    P = shape_bucket(max(len(p) for p in prompts), g.max_prompt_tokens)
    R = shape_bucket(max(max((len(t) for t in gen.tokens), default=1), 1), g.max_response_tokens)
    N = len(prompts)
    tokens = np.zeros((N, P + R), np.int32)
    segments = np.zeros((N, P + R), np.int32)
    mask = np.zeros((N, R), np.float32)
    rollout_logp = np.zeros((N, R), np.float32)
    for i, (p, t, lp) in enumerate(zip(prompts, gen.tokens, gen.logprobs)):
      tokens[i, P - len(p):P] = p
      tokens[i, P:P + len(t)] = t
      segments[i, P - len(p):P + len(t)] = 1
      mask[i, :len(t)] = 1.0
      rollout_logp[i, :len(t)] = lp
    return {"tokens": tokens, "segment_ids": segments, "mask": mask, "adv": adv_N.astype(np.float32)}, rollout_logp
