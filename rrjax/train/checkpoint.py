"""Orbax checkpoints of a run: async, atomic (Orbax commits a step only when every file is written), the
last K kept. Items of a step:

  params  {"trainable": ..., "frozen": ...}   restored alone by `rrjax.from_pretrained` and the exporter
  train   {"step", "opt_state", "rng"}
  data    the grain iterator state, one file per process
  meta    JSON: the model config (HF fields + policy), LoRA settings, the trainer

A resume restores into sharded abstract targets, so each host reads only its own shards and the model is
never materialised whole. A latest step that fails to restore is reported and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from rrjax.train.state import TrainState

log = logging.getLogger("rrjax.train")

CHECKPOINT_DIR = "checkpoints"


class CheckpointRestoreError(ValueError):
  pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
  return Path(run_dir).absolute() / CHECKPOINT_DIR


def _items(state: TrainState):
  return ({"trainable": state.params, "frozen": state.frozen},
          {"step": state.step, "opt_state": state.opt_state, "rng": state.rng})


class Checkpointer:
  def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           read_only=read_only, create=not read_only)
    self.directory = checkpoint_dir(run_dir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "train", "data", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator: Any | None, meta: dict) -> None:
    params, train = _items(state)
    items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract: TrainState, data_iterator: Any | None) -> tuple[TrainState, int] | None:
    """The newest restorable step as (state, step), restoring the iterator in place; None when there is
    no checkpoint. A step that fails to restore is skipped with a warning."""
    params_abs, train_abs = _items(abstract)
    damaged = []
    for step in reversed(self.steps()):
      items = dict(params=ocp.args.StandardRestore(params_abs), train=ocp.args.StandardRestore(train_abs))
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # Orbax/tensorstore raise many types for a damaged step
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                    step, self.directory, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        damaged.append(step)
        continue
      self._set_aside(damaged)
      p, t = restored.params, restored.train
      return TrainState(t["step"], p["trainable"], p["frozen"], t["opt_state"], t["rng"]), step
    if self.steps():
      raise CheckpointRestoreError(f"{self.directory}: no step of {self.steps()} could be restored")
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
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_params(self, step: int, abstract_params: dict) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
