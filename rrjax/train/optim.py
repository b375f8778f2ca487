"""The optimizer: AdamW, warmup + cosine (or constant) schedule, global-norm clipping."""

from __future__ import annotations

import math

import optax

from rrjax.train.config import OptimizerConfig

# Whose schedule: 'hf' (transformers, what LLaMA-Factory's SFT runs) or 'verl' (verl 0.4.0, GRPO).
SCHEDULE_RULES = ("hf", "verl")


def warmup_steps(config: OptimizerConfig, total_steps: int, rule: str = "hf") -> int:
  """'hf': ceil(ratio x total), TrainingArguments.get_warmup_steps (transformers 4.52.4 training_args.py:2469);
  'verl': int(ratio x total), verl 0.4.0 workers/fsdp_workers.py:359."""
  if rule == "verl":
    return int(config.warmup_ratio * total_steps)
  if rule != "hf":
    raise ValueError(f"schedule rule: {rule!r} is not one of {SCHEDULE_RULES}")
  return math.ceil(config.warmup_ratio * total_steps)


def schedule(config: OptimizerConfig, total_steps: int, rule: str = "hf") -> optax.Schedule:
  """HF's get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup: linear from 0 over the warmup
  steps, then cosine to `final_lr_ratio * lr` at `total_steps` (or constant). verl's copies
  (utils/torch_functional.py:462, :506) differ only in the rounding of the warmup and, for cosine, in starting
  the warmup at `final_lr_ratio * lr` (its min_lr_ratio, :498)."""
  warmup = warmup_steps(config, total_steps, rule)
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(config.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)],
                                [warmup])
  if config.schedule != "cosine":
    raise ValueError(f"OptimizerConfig.schedule: {config.schedule!r} is not cosine or constant")
  floor = config.lr * config.final_lr_ratio
  return optax.warmup_cosine_decay_schedule(
      init_value=floor if rule == "verl" else 0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=floor)


def make_optimizer(config: OptimizerConfig, total_steps: int, *, rule: str = "hf",
                   updates_per_count: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on `schedule(config, total_steps, rule)`, the schedule advancing once every `updates_per_count`
  optimizer updates (verl: once per rollout step of several updates). Returns (tx, lr of the update count)."""
  per_count = schedule(config, total_steps, rule)
  lr = per_count if updates_per_count == 1 else (lambda count: per_count(count // updates_per_count))
  parts = []
  if config.clip_norm and config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
  return optax.chain(*parts), lr
