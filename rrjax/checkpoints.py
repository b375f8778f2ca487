"""`rrjax.from_pretrained`: one loader for Hugging Face directories and rrjax training checkpoints.

An rrjax checkpoint may be named by its run directory (the newest step), its `checkpoints/` directory,
or one step directory (`.../checkpoints/1200`). Only the parameters are restored, each shard straight onto
its device; LoRA adapters are merged into the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from rrjax import sharding as sharding_lib
from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2, Qwen2Config


def _locate(path: Path) -> tuple[Path, int | None] | None:
  """(run directory, step or None for the newest) when `path` is an rrjax checkpoint."""
  from rrjax.train.checkpoint import CHECKPOINT_DIR
  if (path / CHECKPOINT_DIR).is_dir():
    return path, None
  if path.name == CHECKPOINT_DIR and path.is_dir():
    return path.parent, None
  if path.parent.name == CHECKPOINT_DIR and path.name.isdigit():
    return path.parent.parent, int(path.name)
  return None


def run_dir_of(path: str | os.PathLike) -> Path:
  """The run directory of an rrjax checkpoint path (the path itself for anything else)."""
  located = _locate(Path(path))
  return located[0] if located else Path(path)


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, config: Qwen2Config | None = None,
         dtype: str | None = None) -> Qwen2:
  """A model from an HF directory or an rrjax checkpoint. `config` (for example with a training run's
  dtype/kernel policy) overrides the stored architecture's policy fields."""
  path = Path(path)
  if not path.exists():
    raise hf.CheckpointError(f"{path}: no such file or directory")
  policy = {}
  if config is not None:
    policy = config.policy()
  elif dtype is not None:
    policy = {"param_dtype": dtype, "dtype": dtype}
  if (path / "config.json").exists():
    return hf.from_hf(path, dtype=policy.get("param_dtype") or dtype, mesh=mesh, config_overrides=policy)
  located = _locate(path)
  if located is None:
    raise hf.CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor an rrjax checkpoint "
                             "(a run directory with checkpoints/)")
  return _load_rrjax(*located, mesh=mesh, policy=policy)


def _open_step(run_dir: Path, step: int | None):
  """(Checkpointer, step, meta) of `step`, or of the newest finished step when None."""
  from rrjax.train.checkpoint import Checkpointer

  ckpt = Checkpointer(run_dir, read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise hf.CheckpointError(f"{run_dir}: no finished checkpoint")
  if step is not None and step not in steps:
    raise hf.CheckpointError(f"{run_dir}: no checkpoint step {step} (have {steps})")
  step = steps[-1] if step is None else step
  return ckpt, step, ckpt.meta(step)


def _config_from_meta(meta: dict, source: str, policy: dict) -> Qwen2Config:
  """The stored architecture with the stored policy, overridden by `policy`; without LoRA fields."""
  return Qwen2Config.from_hf_dict(meta["model"], source=source, **{**meta.get("policy", {}), **policy})


def load_config(path: str | os.PathLike, **policy) -> Qwen2Config:
  """The architecture of an HF directory or an rrjax checkpoint (base model, no adapters), with `policy`."""
  path = Path(path)
  if (path / "config.json").exists():
    return hf.load_config(path, **policy)
  located = _locate(path)
  if located is None:
    raise hf.CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor an rrjax checkpoint "
                             "(a run directory with checkpoints/)")
  ckpt, step, meta = _open_step(*located)
  ckpt.close()
  return _config_from_meta(meta, f"{ckpt.directory}/{step}/meta", policy)


def _load_rrjax(run_dir: Path, step: int | None, *, mesh: Mesh | None, policy: dict) -> Qwen2:
  from rrjax.train import lora as lora_lib
  from rrjax.train import state as state_lib
  from rrjax.train.config import LoraConfig

  ckpt, step, meta = _open_step(run_dir, step)
  config = _config_from_meta(meta, f"{ckpt.directory}/{step}/meta", policy)
  lora = LoraConfig(**{**meta.get("lora", {}), "targets": tuple(meta.get("lora", {}).get("targets", ()))})
  config = lora_lib.with_lora_config(config, lora)
  if mesh is None:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=1), devices=jax.local_devices()[:1])
  graphdef, trainable, frozen = state_lib.abstract_params(lambda: Qwen2(config, rngs=nnx.Rngs(0)), mesh)
  params = ckpt.restore_params(step, {"trainable": trainable, "frozen": frozen})
  ckpt.close()
  model = nnx.merge(graphdef, params["trainable"], params["frozen"])
  return lora_lib.merge_lora(model)


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None) -> Qwen2:
  """A Qwen2 model from a Hugging Face directory (config.json + safetensors) or an rrjax checkpoint."""
  return load(path, mesh=mesh, dtype=dtype)
