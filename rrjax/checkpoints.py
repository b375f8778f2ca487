"""The rrjax run-directory format, read and written in one place, and `rrjax.from_pretrained`.

A run directory holds Orbax checkpoints under `checkpoints/<step>/` (async, atomic: Orbax commits a step
only when every file is written; the last K kept). Items of a step:

  params  {"trainable": ..., "frozen": ...}   restored alone by `from_pretrained` and the exporter
  train   {"step", "opt_state", "rng"}        the rest of the train state
  data    the grain iterator state, one file per process
  meta    JSON: the model architecture (HF fields), its policy, the LoRA settings, the trainer

The trainer writes through `Checkpointer`; inference reads through `load` (a run, its `checkpoints/`, or one
step directory), which restores only the parameters, each shard straight onto its device, and merges LoRA.
A latest step that fails to restore is set aside and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from rrjax import sharding as sharding_lib
from rrjax.model import hf
from rrjax.model import lora as lora_lib
from rrjax.model.hf import CheckpointError
from rrjax.model.qwen2 import Qwen2, Qwen2Config

log = logging.getLogger("rrjax.checkpoints")

CHECKPOINT_DIR = "checkpoints"
__all__ = ["CHECKPOINT_DIR", "CheckpointError", "Checkpointer", "from_pretrained", "load_config", "meta_for",
           "run_dir_of"]


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
  return Path(run_dir).absolute() / CHECKPOINT_DIR


def meta_for(model_cfg: Qwen2Config, lora: lora_lib.LoraConfig, trainer: str) -> dict:
  """The `meta` item: the architecture (without adapters), its policy, the adapters, the trainer."""
  return {"model": model_cfg.to_hf_dict(), "policy": model_cfg.policy(), "lora": dataclasses.asdict(lora),
          "trainer": trainer}


def config_from_meta(meta: dict, source: str, policy: dict | None = None) -> Qwen2Config:
  """The stored architecture with the stored policy (overridden by `policy`) and the stored adapters."""
  try:
    config = Qwen2Config.from_hf_dict(meta["model"], source=source, **{**meta.get("policy", {}), **(policy or {})})
    return config.replace(lora=lora_lib.LoraConfig(**meta.get("lora", {})))
  except (KeyError, TypeError, ValueError) as e:
    message = " ".join(str(e).split())
    raise CheckpointError(message if message.startswith(source) else f"{source}: {message}") from None


class Checkpointer:
  """The Orbax manager of one run directory's `checkpoints/`."""

  def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    import orbax.checkpoint as ocp  # only runs need Orbax; HF checkpoints do not

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           read_only=read_only, create=not read_only)
    self._ocp = ocp
    self.directory = checkpoint_dir(run_dir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "train", "data", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: dict, train: dict, data_iterator: Any | None, meta: dict) -> None:
    args = self._ocp.args
    items = dict(params=args.StandardSave(params), train=args.StandardSave(train), meta=args.JsonSave(meta))
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=args.Composite(**items), force=True)

  def restore(self, abstract_params: dict, abstract_train: dict,
              data_iterator: Any | None) -> tuple[dict, dict, int] | None:
    """(params, train, step) of the newest restorable step, restoring the iterator in place; None when there
    is no checkpoint. A step that fails to restore is set aside with a warning and the previous one tried."""
    args = self._ocp.args
    damaged = []
    for step in reversed(self.steps()):
      items = dict(params=args.StandardRestore(abstract_params), train=args.StandardRestore(abstract_train))
      if data_iterator is not None:
        import grain
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=args.Composite(**items))
      except Exception as e:  # Orbax/tensorstore raise many types for a damaged step
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                    step, self.directory, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        damaged.append(step)
        continue
      self._set_aside(damaged)
      return restored.params, restored.train, step
    if self.steps():
      raise CheckpointError(f"{self.directory}: no step of {self.steps()} could be restored")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of the manager's view (kept for inspection) so the run can save them anew."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.with_name(CHECKPOINT_DIR + ".damaged")
      aside.mkdir(exist_ok=True)
      for step in steps:
        os.replace(self.directory / str(step), aside / f"{step}.{int(time.time())}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rrjax_checkpoint_set_aside")
    self.manager.reload()

  def meta(self, step: int | None = None) -> dict:
    step = self.steps()[-1] if step is None else step
    args = self._ocp.args
    return self.manager.restore(step, args=args.Composite(meta=args.JsonRestore())).meta

  def restore_params(self, step: int, abstract_params: dict) -> dict:
    args = self._ocp.args
    return self.manager.restore(step, args=args.Composite(params=args.StandardRestore(abstract_params))).params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------- reading: from_pretrained


def _locate(path: Path) -> tuple[Path, int | None] | None:
  """(run directory, step or None for the newest) when `path` is an rrjax checkpoint."""
  if (path / CHECKPOINT_DIR).is_dir():
    return path, None
  if path.name == CHECKPOINT_DIR and path.is_dir():
    return path.parent, None
  if path.parent.name == CHECKPOINT_DIR and path.name.isdigit():
    return path.parent.parent, int(path.name)
  return None


def _located(path: Path) -> tuple[Path, int | None]:
  located = _locate(path)
  if located is None:
    raise CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor an rrjax checkpoint "
                          "(a run directory with checkpoints/)")
  return located


def run_dir_of(path: str | os.PathLike) -> Path:
  """The run directory of an rrjax checkpoint path (the path itself for anything else)."""
  located = _locate(Path(path))
  return located[0] if located else Path(path)


def _open_step(run_dir: Path, step: int | None) -> tuple[Checkpointer, int, dict]:
  """(Checkpointer, step, meta) of `step`, or of the newest finished step when None."""
  ckpt = Checkpointer(run_dir, read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"{run_dir}: no finished checkpoint")
  if step is not None and step not in steps:
    raise CheckpointError(f"{run_dir}: no checkpoint step {step} (have {steps})")
  step = steps[-1] if step is None else step
  return ckpt, step, ckpt.meta(step)


def load_config(path: str | os.PathLike, **policy) -> Qwen2Config:
  """The base architecture (no adapters) of an HF directory or an rrjax checkpoint, with `policy`."""
  path = Path(path)
  if (path / "config.json").exists():
    return hf.load_config(path, **policy)
  ckpt, step, meta = _open_step(*_located(path))
  ckpt.close()
  return config_from_meta(meta, f"{ckpt.directory}/{step}/meta", policy).replace(lora=lora_lib.LoraConfig())


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
                    policy: dict | None = None) -> Qwen2:
  """A Qwen2 model from a Hugging Face directory (config.json + safetensors) or an rrjax checkpoint (LoRA
  merged). `dtype` sets the parameter and compute dtype (default: f32 on CPU, bf16 elsewhere); `policy`
  (Qwen2Config policy fields, e.g. a training run's) overrides the stored ones."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  policy = dict(policy or {})
  if dtype is not None and not policy:
    policy = {"param_dtype": dtype, "dtype": dtype}
  if (path / "config.json").exists():
    return hf.from_hf(path, dtype=policy.get("param_dtype") or dtype, mesh=mesh, config_overrides=policy)
  run_dir, step = _located(path)
  ckpt, step, meta = _open_step(run_dir, step)
  config = config_from_meta(meta, f"{ckpt.directory}/{step}/meta", policy)
  if mesh is None:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=1), devices=jax.local_devices()[:1])
  abstract = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = sharding_lib.abstract_state(abstract, mesh, lora_lib.trainable(config), ...)
  params = ckpt.restore_params(step, {"trainable": trainable, "frozen": frozen})
  ckpt.close()
  return lora_lib.merge_lora(nnx.merge(graphdef, params["trainable"], params["frozen"]))

