"""The one training loop that SFT and GRPO share: resume, step, log, checkpoint, export.

A trainer supplies the model constructor, the optimizer, a checkpointable data iterator and a step
function; everything about runs (directories, resume, NaN handling, logging, checkpoints, export) lives
here once.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from rrjax import checkpoints as checkpoint_lib
from rrjax import fileio, hardware
from rrjax import sharding as sharding_lib
from rrjax import tokenizer as tokenizer_lib
from rrjax.model import hf
from rrjax.model import lora as lora_lib
from rrjax.model.qwen2 import Qwen2, Qwen2Config
from rrjax.train import logger as logger_lib
from rrjax import aot
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

  def programs(self, hbm_bytes: int | None = None) -> list[aot.Program]: ...  # a step's, at the largest shapes

  def adopt(self, program: aot.Program, compiled) -> None: ...  # reuse a preflight compile

  def tokens_per_step(self) -> int: ...  # positions one step trains on at the programs' shapes (rrjax.cost)


def model_config(config: TrainConfig) -> Qwen2Config:
  """The architecture of `init_from` when given (with this run's dtype/kernel/remat policy), else config.model."""
  if not config.init_from:
    return config.model
  return checkpoint_lib.load_config(config.init_from, **config.model.policy())


def model_constructor(config: TrainConfig, model_cfg: Qwen2Config) -> Callable[[], nnx.Module]:
  """Random initialisation (with adapters when LoRA is on): the shape and sharding template of the state."""
  cfg = model_cfg.replace(lora=config.lora)
  return lambda: Qwen2(cfg, rngs=nnx.Rngs(config.seed))


def build_model(config: TrainConfig, model_cfg: Qwen2Config, mesh: Mesh) -> nnx.Module:
  """The starting weights: random (created sharded) or imported from `init_from`, then LoRA if asked."""
  if not config.init_from:
    return sharding_lib.create_sharded(model_constructor(config, model_cfg), mesh)
  model = checkpoint_lib.from_pretrained(config.init_from, mesh=mesh, policy=model_cfg.policy())
  if config.lora.rank:
    with jax.set_mesh(mesh):
      model = lora_lib.apply_lora(model, config.lora, seed=config.seed)
    model = sharding_lib.shard_model(model, mesh)
  return model


def _throughput(trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
  """tokens/s, and MFU where the trainer knows its FLOPs per token and the devices' peak."""
  if "seq_tokens" not in metrics or not metrics["step_time_s"]:
    return {}
  tps = metrics["seq_tokens"] / metrics["step_time_s"]
  out = {"tokens_per_s": tps}
  if getattr(trainer, "flops_per_token", None) and getattr(trainer, "peak_flops", None):
    out["mfu"] = tps * trainer.flops_per_token / trainer.peak_flops
  return out


def _last_good(ckpt: checkpoint_lib.Checkpointer) -> str:
  ckpt.wait()
  good = ckpt.steps()
  return f"the last good checkpoint is step {good[-1] if good else 'none'} in {ckpt.directory}"


def _finite(metrics: dict[str, float]) -> bool:
  return all(math.isfinite(v) for k, v in metrics.items() if k in ("loss", "grad_norm"))


MakeTrainer = Callable[[TrainConfig, Mesh, Qwen2Config, tokenizer_lib.Tokenizer], Trainer]


def run(config: TrainConfig, make_trainer: MakeTrainer, *, operative_config: str | None = None) -> state_lib.TrainState:
  """Trains to `trainer.total_steps`, resuming from the newest checkpoint in `config.run_dir`."""
  run_dir = Path(config.run_dir)
  primary = jax.process_index() == 0
  # Every check (data, shapes, preflight, restore) runs before anything of the run is written; a run that fails
  # one leaves run_dir as it found it (no new directory, nothing half-written beside an existing run).
  with fileio.removed_on_error(run_dir, enabled=primary):
    model_cfg = model_config(config)
    tok = tokenizer_lib.load(config.tokenizer or config.init_from, model_type=model_cfg.model_type)
    mesh = sharding_lib.make_mesh(config.mesh)
    trainer = make_trainer(config, mesh, model_cfg, tok)
    lay = state_lib.layout(model_constructor(config, model_cfg), trainer.tx, mesh)
    trainer.bind(lay)
    preflight = _preflight(trainer, mesh) if config.preflight else None
    ckpt = checkpoint_lib.Checkpointer(run_dir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
    try:
      iterator = trainer.data_iterator()
      restored = _restore(ckpt, lay.abstract, iterator)
      state = None if restored is not None else state_lib.init_state(
          build_model(config, model_cfg, mesh), trainer.tx, lay, config.seed)
      if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        if operative_config is not None:
          fileio.write_text(run_dir / "operative_config.gin", operative_config)
        tok.save(run_dir)  # the run directory is a tokenizer directory too: tokenizer.load(run_dir)
        if preflight is not None:
          aot.write(preflight, run_dir / aot.FILE)
    except BaseException:
      ckpt.close()
      raise
  if restored is None:
    start = 0
    print(f"rrjax.train: new run in {run_dir} ({sharding_lib.describe(mesh)})", flush=True)
  else:
    state, start = restored
    print(f"rrjax.train: resumed {run_dir} at step {start}", flush=True)
  meta = checkpoint_lib.meta_for(model_cfg, config.lora, config.trainer)
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
      try:
        new_state, metrics = trainer.step(state, batch)
      except TrainingDiverged as e:
        raise TrainingDiverged(f"step {step + 1}: {e}; stopped, {_last_good(ckpt)}") from None
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["step_time_s"] = time.perf_counter() - t0
      metrics.update(_throughput(trainer, metrics))
      if not getattr(trainer, "skips_non_finite", False) and not _finite(metrics):
        raise TrainingDiverged(
            f"step {step + 1}: loss {metrics.get('loss')} grad_norm {metrics.get('grad_norm')} is not finite; "
            f"stopped, {_last_good(ckpt)}")
      state = new_state
      if (step + 1) % config.log_every == 0 or step + 1 == total:
        logger.log(step + 1, metrics, total_steps=total)
      if (step + 1) % config.checkpoint.every_steps == 0 or step + 1 == total:
        _save(ckpt, step + 1, state, iterator, meta)
    if total > start and total not in ckpt.steps():
      _save(ckpt, total, state, iterator, meta)
  finally:
    ckpt.close()
    logger.close()
  if primary:
    logger_lib.plot(run_dir)
  if config.export_hf and total > 0:
    model = state_lib.model_from_state(lay, state)
    model = lora_lib.merge_lora(model)
    out = hf.save_pretrained(model, run_dir / "hf", dtype=config.export_dtype, tokenizer=tok)
    print(f"rrjax.train: exported Hugging Face checkpoint to {out}", flush=True)
  return state


def _preflight(trainer: Trainer, mesh: Mesh) -> dict:
  """Compiles every program before the first step (the step then reuses them) and prints the per-device memory
  in one line; a run that cannot fit stops here. Returns the report (the run writes it as preflight.json)."""
  devices = list(mesh.devices.flat)
  platform = hardware.platform()
  from rrjax import cost
  rep = aot.measure(trainer, mesh, topology=f"{platform}:{len(devices)}", platform=platform,
                    hbm_bytes=hardware.device_memory_bytes(devices[0]), adopt=True, cost=True,
                    chip=cost.chip_for_device_kind(devices[0].device_kind))
  print(f"rrjax.train: preflight: {aot.summary(rep)}", flush=True)
  for warning in rep["warnings"]:
    log.warning("preflight: %s", warning)
  if not rep["fits"]:
    raise ValueError(f"preflight: {aot.failure(rep)}")
  return rep


def _save(ckpt: checkpoint_lib.Checkpointer, step: int, state: state_lib.TrainState, iterator, meta: dict) -> None:
  train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
  ckpt.save(step, {"trainable": state.params, "frozen": state.frozen}, train, iterator, meta)


def _restore(ckpt: checkpoint_lib.Checkpointer, abstract: state_lib.TrainState, iterator):
  """(state, step) of the newest restorable checkpoint, or None."""
  train = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
  restored = ckpt.restore({"trainable": abstract.params, "frozen": abstract.frozen}, train, iterator)
  if restored is None:
    return None
  p, t, step = restored
  return state_lib.TrainState(t["step"], p["trainable"], p["frozen"], t["opt_state"], t["rng"]), step

