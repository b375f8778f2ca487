"""The one training loop that SFT and GRPO share: resume, step, log, checkpoint, export.

A trainer supplies the model constructor, the optimizer, a checkpointable data iterator and a step
function; everything about runs (directories, resume, NaN handling, logging, checkpoints, export) lives
here once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from rrjax import checkpoints as pretrained
from rrjax import sharding as sharding_lib
from rrjax import tokenizer as tokenizer_lib
from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2, Qwen2Config
from rrjax.train import checkpoint as checkpoint_lib
from rrjax.train import lora as lora_lib
from rrjax.train import logger as logger_lib
from rrjax.train import state as state_lib
from rrjax.train.config import TrainConfig

log = logging.getLogger("rrjax.train")

class TrainingDiverged(ValueError):
  pass


class Trainer(Protocol):
  """What a training method provides to the loop."""

  tx: optax.GradientTransformation
  total_steps: int

  def data_iterator(self) -> Iterator[Any]: ...  # with grain-style get_state/set_state

  def bind(self, lay: state_lib.StateLayout) -> None: ...  # the graphdef and shardings, before any step

  def step(self, state: state_lib.TrainState, batch: Any) -> tuple[state_lib.TrainState, dict[str, Any]]: ...


def model_config(config: TrainConfig) -> Qwen2Config:
  """The architecture of `init_from` when given (with this run's dtype/kernel/remat policy), else config.model."""
  if not config.init_from:
    return config.model
  return pretrained.load_config(config.init_from, **config.model.policy())


def model_constructor(config: TrainConfig, model_cfg: Qwen2Config) -> Callable[[], nnx.Module]:
  """Random initialisation (with adapters when LoRA is on): the shape and sharding template of the state."""
  cfg = lora_lib.with_lora_config(model_cfg, config.lora)
  return lambda: Qwen2(cfg, rngs=nnx.Rngs(config.seed))


def build_model(config: TrainConfig, model_cfg: Qwen2Config, mesh: Mesh) -> nnx.Module:
  """The starting weights: random (created sharded) or imported from `init_from`, then LoRA if asked."""
  if not config.init_from:
    return sharding_lib.create_sharded(model_constructor(config, model_cfg), mesh)
  model = pretrained.load(config.init_from, mesh=mesh, config=model_cfg)
  if config.lora.rank:
    with jax.set_mesh(mesh):
      model = lora_lib.apply_lora(model, config.lora, seed=config.seed)
    model = sharding_lib.shard_model(model, mesh)
  return model


def checkpoint_meta(config: TrainConfig, model_cfg: Qwen2Config) -> dict:
  return {"model": model_cfg.to_hf_dict(), "policy": model_cfg.policy(),
          "lora": dataclasses.asdict(config.lora), "trainer": config.trainer}


def _throughput(trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
  """tokens/s, and MFU where the trainer knows its FLOPs per token and the devices' peak."""
  if "seq_tokens" not in metrics or not metrics["step_time_s"]:
    return {}
  tps = metrics["seq_tokens"] / metrics["step_time_s"]
  out = {"tokens_per_s": tps}
  if getattr(trainer, "flops_per_token", None) and getattr(trainer, "peak_flops", None):
    out["mfu"] = tps * trainer.flops_per_token / trainer.peak_flops
  return out


def _finite(metrics: dict[str, float]) -> bool:
  return all(math.isfinite(v) for k, v in metrics.items() if k in ("loss", "grad_norm"))


def run(config: TrainConfig, make_trainer: Callable[[TrainConfig, Mesh, Qwen2Config], Trainer], *,
        operative_config: str | None = None) -> state_lib.TrainState:
  """Trains to `trainer.total_steps`, resuming from the newest checkpoint in `config.run_dir`."""
  run_dir = Path(config.run_dir)
  primary = jax.process_index() == 0
  tok = tokenizer_lib.load(config.tokenizer or config.init_from)
  if primary:
    run_dir.mkdir(parents=True, exist_ok=True)
    if operative_config is not None:
      _atomic_write(run_dir / "operative_config.gin", operative_config)
    tok.save(run_dir)  # the run directory is a tokenizer directory too: tokenizer.load(run_dir)
  mesh = sharding_lib.make_mesh(config.mesh)
  model_cfg = model_config(config)
  trainer = make_trainer(config, mesh, model_cfg)
  lay = state_lib.layout(model_constructor(config, model_cfg), trainer.tx, mesh)
  trainer.bind(lay)
  ckpt = checkpoint_lib.Checkpointer(run_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  iterator = trainer.data_iterator()
  restored = ckpt.restore(lay.abstract, iterator)
  if restored is None:
    state = state_lib.init_state(build_model(config, model_cfg, mesh), trainer.tx, lay, config.seed)
    start = 0
    print(f"rrjax.train: new run in {run_dir} ({sharding_lib.describe(mesh)})", flush=True)
  else:
    state, start = restored
    print(f"rrjax.train: resumed {run_dir} at step {start}", flush=True)
  meta = checkpoint_meta(config, model_cfg)
  logger = logger_lib.MetricsLogger(run_dir, resume_step=start, enabled=primary)
  if operative_config and start == 0:
    logger.text("operative_config", operative_config)
  total = trainer.total_steps
  try:
    for step in range(start, total):
      try:
        batch = next(iterator)
      except StopIteration:
        print(f"rrjax.train: data exhausted after {step} steps", flush=True)
        total = step
        break
      t0 = time.perf_counter()
      new_state, metrics = trainer.step(state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["step_time_s"] = time.perf_counter() - t0
      metrics.update(_throughput(trainer, metrics))
      if not _finite(metrics):
        ckpt.wait()
        good = ckpt.steps()
        raise TrainingDiverged(
            f"step {step + 1}: loss {metrics.get('loss')} grad_norm {metrics.get('grad_norm')} is not finite; "
            f"stopped, the last good checkpoint is step {good[-1] if good else 'none'} in {ckpt.directory}")
      state = new_state
      if (step + 1) % config.log_every == 0 or step + 1 == total:
        logger.log(step + 1, metrics, total_steps=total)
      if (step + 1) % config.checkpoint.every_steps == 0 or step + 1 == total:
        ckpt.save(step + 1, state, iterator, meta)
    if total > start and total not in ckpt.steps():
      ckpt.save(total, state, iterator, meta)
  finally:
    ckpt.close()
    logger.close()
  if primary:
    logger_lib.plot(run_dir)
  if config.export_hf and total > 0:
    model = state_lib.model_from_state(lay, state)
    if config.lora.rank:
      model = lora_lib.merge_lora(model)
    out = hf.save_hf(model, run_dir / "hf", dtype=config.export_dtype, tokenizer=tok)
    print(f"rrjax.train: exported Hugging Face checkpoint to {out}", flush=True)
  return state


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
