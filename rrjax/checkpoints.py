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
    policy = {f: getattr(config, f) for f in ("param_dtype", "dtype", "attention", "scan_layers", "remat")}
  elif dtype is not None:
    policy = {"param_dtype": dtype, "dtype": dtype}
  if (path / "config.json").exists():
    return hf.from_hf(path, dtype=policy.get("param_dtype") or dtype, mesh=mesh, config_overrides=policy)
  located = _locate(path)
  if located is None:
    raise hf.CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor an rrjax checkpoint "
                             "(a run directory with checkpoints/)")
  return _load_rrjax(*located, mesh=mesh, policy=policy)


def _load_rrjax(run_dir: Path, step: int | None, *, mesh: Mesh | None, policy: dict) -> Qwen2:
  from rrjax.train import lora as lora_lib
  from rrjax.train import state as state_lib
  from rrjax.train.checkpoint import Checkpointer
  from rrjax.train.config import LoraConfig

  ckpt = Checkpointer(run_dir, read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise hf.CheckpointError(f"{run_dir}: no finished checkpoint")
  if step is not None and step not in steps:
    raise hf.CheckpointError(f"{run_dir}: no checkpoint step {step} (have {steps})")
  step = steps[-1] if step is None else step
  meta = ckpt.meta(step)
  defaults = {f: v for f, v in meta.get("policy", {}).items()}
  config = Qwen2Config.from_hf_dict(meta["model"], source=f"{ckpt.directory}/{step}/meta", **{**defaults, **policy})
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
