"""The optimizer: AdamW, warmup + cosine (or constant) schedule, global-norm clipping."""

from __future__ import annotations

import math

import optax

from rrjax.train.config import OptimizerConfig


def warmup_steps(config: OptimizerConfig, total_steps: int) -> int:
  """ceil(ratio x total), as HF TrainingArguments.get_warmup_steps (LLaMA-Factory's schedule)."""
  return math.ceil(config.warmup_ratio * total_steps)


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """HF's get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup: linear from 0 over the warmup
  steps, then cosine to `final_lr_ratio * lr` at `total_steps` (or constant)."""
  warmup = warmup_steps(config, total_steps)
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(config.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)],
                                [warmup])
  if config.schedule != "cosine":
    raise ValueError(f"OptimizerConfig.schedule: {config.schedule!r} is not cosine or constant")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=config.lr * config.final_lr_ratio)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(config, total_steps)
  parts = []
  if config.clip_norm and config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
  return optax.chain(*parts), lr
