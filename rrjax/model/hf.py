"""Hugging Face Qwen2 and Qwen3 checkpoints <-> rrjax parameters (safetensors only; no pickle, no network).

Reads what transformers 4.x and 5.x write: float32, bfloat16 or float16 tensors (converted to the requested
dtype), one file or shards with an index, a tied head stored anyway, buffers Qwen2 has no use for (ignored with
one warning). Every failure is a one-line CheckpointError naming the file and the field or tensor.

Import reads one tensor at a time and places it straight onto its sharding through
`jax.make_array_from_callback`, so each host reads only the slices its devices hold. Export writes
safetensors shards (<= 5 GB by default) with an index, config.json, generation_config.json and the
tokenizer files, into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from rrjax import fileio, hardware
from rrjax import sharding as sharding_lib
from rrjax import tokenizer as tokenizer_lib
from rrjax.model.qwen2 import Qwen2, Qwen2Config


log = logging.getLogger("rrjax.hf")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the file and the tensor or field."""


# Per-layer weights: our name -> (HF name template, HF shape -> our per-layer shape, inverse).
def _layer_map(c: Qwen2Config) -> dict[str, tuple[str, Callable, Callable, tuple[int, ...]]]:
  D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  T = lambda w: w.T
  ident = lambda w: w
  out = {
      "attn_norm": ("input_layernorm.weight", ident, ident, (D,)),
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
      "q_norm": ("self_attn.q_norm.weight", ident, ident, (H,)),
      "k_norm": ("self_attn.k_norm.weight", ident, ident, (H,)),
  }
  # Qwen2 has the q/k/v biases and no q/k norms, Qwen3 the other way round (see Qwen2Config).
  absent = ("q_norm", "k_norm") if c.attention_bias else ("q_bias", "k_bias", "v_bias")
  return {ours: entry for ours, entry in out.items() if ours not in absent}


def _top_map(c: Qwen2Config) -> dict[tuple[str, ...], tuple[str, Callable, Callable, tuple[int, ...]]]:
  ident = lambda w: w
  out = {
      ("embed",): ("model.embed_tokens.weight", ident, ident, (c.vocab_size, c.hidden_size)),
      ("final_norm",): ("model.norm.weight", ident, ident, (c.hidden_size,)),
  }
  if not c.tie_word_embeddings:
    out[("lm_head",)] = ("lm_head.weight", lambda w: w.T, lambda w: w.T, (c.vocab_size, c.hidden_size))
  return out


# ---------------------------------------------------------------- reading


# safetensors dtype -> numpy dtype. Parsed here rather than through safetensors' numpy loader, which knows
# bfloat16 only when ml_dtypes has registered it (it depends on import order and version).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_MAX_HEADER_BYTES = 100 * 2**20


class _SafetensorsFile:
  """One safetensors file, memory-mapped; tensors are read-only views of it."""

  def __init__(self, file: Path):
    self.file = file
    try:
      with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= _MAX_HEADER_BYTES:
          raise ValueError(f"header length {n}")
        header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
      raise CheckpointError(f"{file}: not a safetensors file ({' '.join(str(e).split())})") from None
    header.pop("__metadata__", None)
    self.entries: dict[str, dict] = header
    self._data_start = 8 + n
    self._data = None

  def get(self, name: str) -> np.ndarray:
    entry = self.entries[name]
    try:
      kind, shape = entry["dtype"], tuple(int(x) for x in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{self.file}: tensor {name!r} has a malformed header entry {entry!r}") from None
    if kind not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{self.file}: tensor {name!r} has dtype {kind}; rrjax reads float weights "
                            f"({', '.join(_SAFETENSORS_DTYPES)})")
    dtype = np.dtype(_SAFETENSORS_DTYPES[kind])
    if self._data is None:
      self._data = np.memmap(self.file, dtype=np.uint8, mode="r")
    nbytes = math.prod(shape) * dtype.itemsize
    if not (0 <= begin <= end and end - begin == nbytes and self._data_start + end <= self._data.size):
      raise CheckpointError(f"{self.file}: tensor {name!r}: data offsets {[begin, end]} do not hold {kind} "
                            f"{list(shape)} within the file (truncated or corrupt)")
    return self._data[self._data_start + begin:self._data_start + end].view(dtype).reshape(shape)


class _SafetensorsDir:
  """Lazily opened safetensors files of a checkpoint directory, addressed by tensor name."""

  def __init__(self, path: Path):
    self.path = path
    self._open: dict[Path, _SafetensorsFile] = {}
    index = path / "model.safetensors.index.json"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
          raise ValueError("weight_map is not an object of file names")
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
      self.files = {name: path / f for name, f in weight_map.items()}
    elif (path / "model.safetensors").exists():
      single = self._file(path / "model.safetensors")
      self.files = {name: single.file for name in single.entries}
    else:
      if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; rrjax reads safetensors only")
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in set(self.files.values()):
      if not f.exists():
        raise CheckpointError(f"{f}: shard named in the index is missing")

  def _file(self, file: Path) -> _SafetensorsFile:
    if file not in self._open:
      self._open[file] = _SafetensorsFile(file)
    return self._open[file]

  def raw(self, name: str) -> tuple[Path, np.ndarray]:
    """(file, tensor as stored) of `name`."""
    if name not in self.files:
      raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
    st = self._file(self.files[name])
    if name not in st.entries:
      raise CheckpointError(f"{st.file}: tensor {name!r} is missing (the index names this file for it)")
    return st.file, st.get(name)

  def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    file, array = self.raw(name)
    if tuple(array.shape) != tuple(expected_shape):
      raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"expected {tuple(expected_shape)}")
    return array


def _expected_names(c: Qwen2Config) -> set[str]:
  names = {hf_name for hf_name, *_ in _top_map(c).values()}
  return names | {f"model.layers.{i}.{suffix}" for i in range(c.num_layers) for suffix, *_ in _layer_map(c).values()}


def _check_tied_head(tensors: _SafetensorsDir) -> None:
  """A tied checkpoint may also store lm_head.weight; it must then be the embedding (at the file's precision)."""
  head_file, head = tensors.raw("lm_head.weight")
  _, embed = tensors.raw("model.embed_tokens.weight")
  if head.shape != embed.shape:
    raise CheckpointError(f"{head_file}: tensor 'lm_head.weight' has shape {head.shape} but the embeddings are "
                          f"tied ({embed.shape})")
  eps = max(float(jnp.finfo(head.dtype).eps), float(jnp.finfo(embed.dtype).eps))
  for start in range(0, head.shape[0], 8192):  # row blocks: the table is never copied whole to float32
    h, e = (x[start:start + 8192].astype(np.float32) for x in (head, embed))
    if not np.array_equal(h, e) and not np.allclose(h, e, rtol=eps, atol=eps * float(np.abs(e).max())):
      raise CheckpointError(f"{head_file}: tensor 'lm_head.weight' differs from model.embed_tokens.weight but "
                            f"config.json ties them (tie_word_embeddings: true); max difference "
                            f"{float(np.abs(h - e).max()):.3g} in rows {start}..{start + len(h) - 1}")


def _summarise_names(names) -> str:
  """Names with layer indices folded: "model.layers.*.self_attn.rotary_emb.inv_freq (x24), lm_head.bias"."""
  groups: dict[str, list[str]] = {}
  for name in sorted(names):
    groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
  return ", ".join(g[0] if len(g) == 1 else f"{pattern} (x{len(g)})" for pattern, g in groups.items())


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
    message = " ".join(str(e).split())
    raise CheckpointError(message if message.startswith(str(config_path)) else f"{config_path}: {message}") from None


def from_hf(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
            config_overrides: dict | None = None) -> Qwen2:
  """Loads a Hugging Face Qwen2 or Qwen3 directory into a (sharded) rrjax model. `dtype` sets both the parameter
  and compute dtype (default: bf16 on accelerators, f32 on CPU); `config_overrides` may refine either."""
  path = Path(path)
  dtype = dtype or hardware.default_dtype()
  config = load_config(path, **{"param_dtype": dtype, "dtype": dtype, **(config_overrides or {})})
  tensors = _SafetensorsDir(path)
  extra = set(tensors.files) - _expected_names(config)
  if config.tie_word_embeddings and "lm_head.weight" in extra:
    _check_tied_head(tensors)
    extra.discard("lm_head.weight")
  if extra:
    log.warning("%s: ignoring %d tensor(s) that %s has no use for: %s", path, len(extra), config.model_type,
                _summarise_names(extra))
  return from_tensors(config, tensors.get, mesh=mesh)


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


def save_pretrained(model: Qwen2, path: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 10**9, tokenizer: tokenizer_lib.Tokenizer | None = None) -> Path:
  """Writes an HF directory that transformers' AutoModelForCausalLM loads, with the same logits. Atomic: a
  temporary sibling directory is renamed into place only when every file is written. `dtype`: the tensors'
  (default: the parameters'); shards of at most `max_shard_bytes`; the tokenizer files of `tokenizer`
  (default: the bundled one of the model's family, Qwen2.5's or Qwen3's).

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
  with fileio.atomic_dir(path) as tmp:
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
    tok = tokenizer or tokenizer_lib.load(model_type=model.config.model_type)
    c, generation = _special_ids(model.config, tok)
    (tmp / "config.json").write_text(json.dumps(c.to_hf_dict(torch_dtype), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok.save(tmp)
  return path


def _special_ids(c: Qwen2Config, tok: tokenizer_lib.Tokenizer) -> tuple[Qwen2Config, dict]:
  """The config to export and its generation config. Ids outside the vocabulary (Qwen2.5's ids on a small own
  vocabulary) become the tokenizer's, or null where those do not fit either; null ids stay null: an id that
  the model was never given is not invented."""
  def fits(i):
    return i if i is not None and 0 <= i < c.vocab_size else None

  end_of_text = fits(tok.token_to_id("<|endoftext|>"))
  if any(i is not None and fits(i) is None for i in (c.bos_token_id, c.eos_token_id)):
    c = c.replace(bos_token_id=end_of_text, eos_token_id=fits(tok.eos_token_id))
  generation = {"bos_token_id": c.bos_token_id, "eos_token_id": None, "pad_token_id": None, "do_sample": False}
  if c.eos_token_id is not None:
    stops = [c.eos_token_id] + ([end_of_text] if end_of_text not in (None, c.eos_token_id) else [])
    generation.update(eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=end_of_text)
  return c, generation
