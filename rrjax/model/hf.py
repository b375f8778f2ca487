"""Hugging Face Qwen2 checkpoints <-> rrjax parameters (safetensors only; no pickle, no network).

Import reads one tensor at a time and places it straight onto its sharding through
`jax.make_array_from_callback`, so each host reads only the slices its devices hold. Export writes
safetensors shards (<= 5 GB by default) with an index, config.json, generation_config.json and the
tokenizer files, into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from rrjax import sharding as sharding_lib
from rrjax import tokenizer as tokenizer_lib
from rrjax.model.qwen2 import Qwen2, Qwen2Config


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the file and the tensor or field."""


# Per-layer weights: our name -> (HF name template, HF shape -> our per-layer shape, inverse).
def _layer_map(c: Qwen2Config) -> dict[str, tuple[str, Callable, Callable, tuple[int, ...]]]:
  D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  T = lambda w: w.T
  return {
      "attn_norm": ("input_layernorm.weight", lambda w: w, lambda w: w, (D,)),
      "q_kernel": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H), lambda w: w.reshape(D, N * H).T,
                   (N * H, D)),
      "q_bias": ("self_attn.q_proj.bias", lambda b: b.reshape(N, H), lambda b: b.reshape(N * H), (N * H,)),
      "k_kernel": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T,
                   (K * H, D)),
      "k_bias": ("self_attn.k_proj.bias", lambda b: b.reshape(K, H), lambda b: b.reshape(K * H), (K * H,)),
      "v_kernel": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T,
                   (K * H, D)),
      "v_bias": ("self_attn.v_proj.bias", lambda b: b.reshape(K, H), lambda b: b.reshape(K * H), (K * H,)),
      "o_kernel": ("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T,
                   (D, N * H)),
      "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, lambda w: w, (D,)),
      "gate_kernel": ("mlp.gate_proj.weight", T, T, (F, D)),
      "up_kernel": ("mlp.up_proj.weight", T, T, (F, D)),
      "down_kernel": ("mlp.down_proj.weight", T, T, (D, F)),
  }


def _top_map(c: Qwen2Config) -> dict[tuple[str, ...], tuple[str, Callable, Callable, tuple[int, ...]]]:
  ident = lambda w: w
  out = {
      ("embed",): ("model.embed_tokens.weight", ident, ident, (c.vocab_size, c.hidden_size)),
      ("final_norm",): ("model.norm.weight", ident, ident, (c.hidden_size,)),
  }
  if not c.tie_word_embeddings:
    out[("lm_head",)] = ("lm_head.weight", lambda w: w.T, lambda w: w.T, (c.vocab_size, c.hidden_size))
  return out


def default_dtype() -> str:
  """bf16 on accelerators, f32 on CPU."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# ---------------------------------------------------------------- reading


class _SafetensorsDir:
  """Lazily opened safetensors files of a checkpoint directory, addressed by tensor name."""

  def __init__(self, path: Path):
    self.path = path
    index = path / "model.safetensors.index.json"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
      self.files = {name: path / f for name, f in weight_map.items()}
    elif (path / "model.safetensors").exists():
      with safetensors.safe_open(path / "model.safetensors", framework="numpy") as f:
        self.files = {name: path / "model.safetensors" for name in f.keys()}
    else:
      if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; rrjax reads safetensors only")
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in set(self.files.values()):
      if not f.exists():
        raise CheckpointError(f"{f}: shard named in the index is missing")
    self._open = {}

  def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.files:
      raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safetensors.safe_open(file, framework="numpy")
    try:
      array = self._open[file].get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None
    if tuple(array.shape) != tuple(expected_shape):
      raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"expected {tuple(expected_shape)}")
    return array


def load_config(path: str | os.PathLike, **overrides) -> Qwen2Config:
  config_path = Path(path) / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{config_path}: missing")
  try:
    d = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None
  try:
    return Qwen2Config.from_hf_dict(d, source=str(config_path), **overrides)
  except (ValueError, TypeError) as e:
    raise CheckpointError(str(e)) from None


def from_hf(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
            config_overrides: dict | None = None) -> Qwen2:
  """Loads a Hugging Face Qwen2 directory into a (sharded) rrjax model. `dtype` sets both the parameter
  and compute dtype (default: bf16 on accelerators, f32 on CPU); `config_overrides` may refine either."""
  path = Path(path)
  dtype = dtype or default_dtype()
  config = load_config(path, **{"param_dtype": dtype, "dtype": dtype, **(config_overrides or {})})
  return from_tensors(config, _SafetensorsDir(path).get, mesh=mesh)


def from_tensors(config: Qwen2Config, get: Callable[[str, tuple[int, ...]], np.ndarray], *,
                 mesh: Mesh | None = None) -> Qwen2:
  """Builds a model whose weights come from `get(hf_name, hf_shape)`, one tensor at a time, each placed
  straight onto its sharding (only the slices this host's devices hold are materialised)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
  if mesh is None:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=1), devices=jax.local_devices()[:1])
  shardings = sharding_lib.state_shardings(abstract, mesh)
  np_dtype = np.dtype(jnp.dtype(config.param_dtype))

  def place(shape, target_sharding, read_rows: Callable[[slice], np.ndarray]):
    def callback(index):
      first = index[0] if index else slice(None)
      rows = read_rows(first).astype(np_dtype)
      return rows[(slice(None),) + tuple(index[1:])] if index else rows
    return jax.make_array_from_callback(shape, target_sharding, callback)

  values = {"layers": {}}
  for (key,), (hf_name, to_ours, _, hf_shape) in _top_map(config).items():
    whole = functools.lru_cache(maxsize=1)(lambda n=hf_name, s=hf_shape, f=to_ours: f(get(n, s)))
    values[key] = place(abstract[key].shape, shardings[key], lambda rows, w=whole: w()[rows])

  for ours, (hf_suffix, to_ours, _, hf_shape) in _layer_map(config).items():
    @functools.lru_cache(maxsize=2)
    def one_layer(i, suffix=hf_suffix, shape=hf_shape, f=to_ours):
      return f(get(f"model.layers.{i}.{suffix}", shape))

    def read_rows(rows, one_layer=one_layer):
      return np.stack([one_layer(i) for i in range(config.num_layers)[rows]])

    values["layers"][ours] = place(abstract["layers"][ours].shape, shardings["layers"][ours], read_rows)

  nnx.replace_by_pure_dict(abstract, values)
  return nnx.merge(graphdef, abstract)


# ---------------------------------------------------------------- writing


def hf_tensors(model: Qwen2, dtype: str | None = None):
  """Yields (HF name, numpy array) for every tensor of `model`, one at a time (host memory stays small)."""
  c = model.config
  np_dtype = np.dtype(jnp.dtype(dtype or c.param_dtype))

  def host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      # Multi-host: every process must take part in each gather, in the same order.
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True)).astype(np_dtype)
    return np.asarray(jax.device_get(x)).astype(np_dtype)

  top = _top_map(c)
  name, _, from_ours, _ = top[("embed",)]
  yield name, host(model.embed[...])
  weights = model.layers.weights()
  for i in range(c.num_layers):
    for ours, (suffix, _, from_ours, _) in _layer_map(c).items():
      yield f"model.layers.{i}.{suffix}", from_ours(host(weights[ours][i]))
  name, _, _, _ = top[("final_norm",)]
  yield name, host(model.final_norm[...])
  if not c.tie_word_embeddings:
    name, _, from_ours, _ = top[("lm_head",)]
    yield name, from_ours(host(model.lm_head[...]))


def save_hf(model: Qwen2, path: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 10**9, tokenizer: tokenizer_lib.Tokenizer | None = None) -> Path:
  """Writes an HF directory that transformers' AutoModelForCausalLM loads. Atomic: a temporary sibling
  directory is renamed into place only when every file is written.

  Multi-host: every process must call it (each tensor is gathered from all of them); process 0 writes.
  """
  path = Path(path)
  if jax.process_count() > 1:
    return _save_hf_multihost(model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
  return _save_hf(model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)


def _save_hf_multihost(model: Qwen2, path: Path, **kwargs) -> Path:
  from jax.experimental import multihost_utils
  try:
    if jax.process_index() == 0:
      _save_hf(model, path, **kwargs)
    else:
      for _ in hf_tensors(model, kwargs.get("dtype")):
        pass
  finally:  # the other processes return only once the directory is in place
    multihost_utils.sync_global_devices("rrjax_save_hf")
  return path


def _save_hf(model: Qwen2, path: Path, *, dtype: str | None, max_shard_bytes: int,
             tokenizer: tokenizer_lib.Tokenizer | None) -> Path:
  dtype = dtype or model.config.param_dtype
  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[str(jnp.dtype(dtype))]
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    # Each shard is written as soon as it is full, so host memory holds at most one shard; the final
    # names need the shard count, so they are given once every shard is on disk.
    shard_names: list[list[str]] = []
    current, current_bytes, total = {}, 0, 0

    def flush():
      nonlocal current, current_bytes
      safetensors.numpy.save_file(current, tmp / f"shard-{len(shard_names)}", metadata={"format": "pt"})
      shard_names.append(list(current))
      current, current_bytes = {}, 0

    for name, array in hf_tensors(model, dtype):
      if current and current_bytes + array.nbytes > max_shard_bytes:
        flush()
      current[name] = np.ascontiguousarray(array)
      current_bytes += array.nbytes
      total += array.nbytes
      if current_bytes >= max_shard_bytes:
        flush()
    if current:
      flush()
    n = len(shard_names)
    weight_map = {}
    for i, names in enumerate(shard_names):
      file = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(tmp / f"shard-{i}", tmp / file)
      weight_map.update({name: file for name in names})
    if n > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    c = model.config
    tok = tokenizer or tokenizer_lib.load()
    end_of_text = tok.token_to_id("<|endoftext|>")
    if max(c.bos_token_id, c.eos_token_id) >= c.vocab_size:  # Qwen2.5's ids, but a small own vocabulary
      c = c.replace(bos_token_id=end_of_text, eos_token_id=tok.eos_token_id)
    (tmp / "config.json").write_text(json.dumps(c.to_hf_dict(torch_dtype), indent=2))
    generation = {"bos_token_id": c.bos_token_id, "eos_token_id": [c.eos_token_id, end_of_text],
                  "pad_token_id": end_of_text, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok.save(tmp)
    if path.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
      os.replace(path, old / "x")
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def save_pretrained(model: Qwen2, path: str | os.PathLike, **kwargs) -> Path:
  """Writes `model` as a Hugging Face directory (see `save_hf`)."""
  return save_hf(model, path, **kwargs)
