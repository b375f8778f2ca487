"""Compiled KV-cache generation: one jitted prefill, one jitted `lax.while_loop` decode.

`generate(model, prompts, max_new_tokens=...)` left-pads the prompts (segment 0 marks padding, positions
come from the mask), prefills the padded block in one call, then decodes one token per step until every
row has stopped or hit its budget. Batch size, prompt length and the new-token budget are rounded up to
buckets, and compiled programs are cached per bucket and sampling structure, so reranking thousands of
windows compiles a handful of programs. On a mesh the weights follow the model's logical-axis rules, the
batch is split over data (and fsdp), and the cache over kv heads where the tensor axis divides them.

Shapes: B batch (bucketed), P prompt slots (bucketed), N new-token slots (bucketed), S = P + N cache
slots, V vocab.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import hardware, sampling
from rrjax import sharding as sharding_lib
from rrjax.model.qwen2 import KVCache, Qwen2, Qwen2Config

GiB = 1024**3


class DecodeMemoryError(ValueError):
  """The KV cache, weights and activations of a decode call do not fit in device memory."""


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Shape buckets: each size is rounded up to `minimum * 2**k * (1 + j / per_octave)`.

  per_octave=1 gives powers of two; 2 adds the midpoints (…, 4096, 6144, 8192, …), which wastes at most a
  third of the prompt slots instead of half, for twice as many programs.
  """

  min_batch: int = 1
  min_prompt: int = 64
  min_new_tokens: int = 32
  prompt_per_octave: int = 2
  batch_per_octave: int = 1
  new_tokens_per_octave: int = 1

  def batch(self, n: int, multiple: int = 1) -> int:
    b = bucket(n, self.min_batch, self.batch_per_octave)
    return -(-b // multiple) * multiple  # a whole number of rows per data shard

  def prompt(self, n: int) -> int:
    return bucket(n, self.min_prompt, self.prompt_per_octave)

  def new_tokens(self, n: int) -> int:
    return bucket(n, self.min_new_tokens, self.new_tokens_per_octave)


def bucket(n: int, minimum: int, per_octave: int = 1) -> int:
  """The smallest bucket >= n (see `Buckets`)."""
  size = max(1, minimum)
  while True:
    for j in range(per_octave):
      candidate = size + (size * j) // per_octave
      if candidate >= n:
        return candidate
    size *= 2


@dataclasses.dataclass(frozen=True)
class Generation:
  """Per row of the input prompts: generated ids (a final stop id is included, as in HF), the logprob of
  each (see rrjax.sampling.select), their count, and "stop" or "length"."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  lengths: list[int]
  finish_reasons: list[str]
  logits: list[np.ndarray] | None = None  # per row [length, V] float32; only with return_logits=True


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Peak bytes per device of one decode call (the largest device), and the device limit if known."""

  weights: int
  kv_cache: int
  activations: int
  limit: int | None

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.activations

  @property
  def fits(self) -> bool:
    return self.limit is None or self.total <= self.limit

  def describe(self) -> str:
    limit = "unknown" if self.limit is None else f"{self.limit / GiB:.3f} GiB"
    return (f"{self.total / GiB:.3f} GiB per device (weights {self.weights / GiB:.3f}, KV cache "
            f"{self.kv_cache / GiB:.3f}, activations {self.activations / GiB:.3f}); device limit {limit}")


# ---------------------------------------------------------------- program cache

MAX_PROGRAMS = 64  # (prefill, decode) pairs kept; the least recently used is dropped beyond that
_PROGRAMS: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_TRACES: collections.Counter = collections.Counter()


def compilation_count() -> int:
  """Programs traced (and so compiled) by this module since the process started."""
  return sum(_TRACES.values())


def default_cache_dtype(config: Qwen2Config) -> str:
  """bf16 on accelerators; the model's compute dtype on CPU (where bf16 is slow and tests want f32)."""
  return config.dtype if hardware.platform() == "cpu" else "bfloat16"


def _data_shards(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  names = dict(sharding_lib.current_rules()).get("batch") or ()
  return math.prod(sizes.get(a, 1) for a in ((names,) if isinstance(names, str) else names))


def _named(mesh: Mesh, names, shape) -> NamedSharding:
  return NamedSharding(mesh, sharding_lib.logical_spec(names, shape, dict(zip(mesh.axis_names, mesh.axis_sizes))))


def _cache_shardings(mesh: Mesh, config: Qwen2Config, batch: int, length: int) -> KVCache:
  kv_shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  axes = KVCache.logical_axes()
  return KVCache(_named(mesh, axes.k_LxBxSxKxH, kv_shape), _named(mesh, axes.v_LxBxSxKxH, kv_shape),
                 _named(mesh, axes.segment_BxS, (batch, length)), NamedSharding(mesh, PartitionSpec()))


def _programs(graphdef, config: Qwen2Config, mesh: Mesh | None, batch: int, prompt: int, new: int,
              cache_dtype: str, stop_ids: tuple[int, ...], static: tuple[bool, int, bool], return_logits: bool):
  key = (graphdef, mesh, batch, prompt, new, cache_dtype, stop_ids, static, return_logits)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _build(graphdef, config, mesh, batch, prompt, new, cache_dtype, stop_ids, static,
                            return_logits)
    while len(_PROGRAMS) > MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  _PROGRAMS.move_to_end(key)
  return _PROGRAMS[key]


def _build(graphdef, config, mesh, batch, prompt, new, cache_dtype, stop_ids, static, return_logits):
  greedy, top_k, nucleus = static
  length = prompt + new
  V = config.vocab_size
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
  trace_key = (batch, prompt, new, cache_dtype, stop_ids, static, return_logits)

  def constrain_cache(cache: KVCache) -> KVCache:
    axes = KVCache.logical_axes()
    return KVCache(*(sharding_lib.constrain(x, a) for x, a in zip(cache, axes)))

  def choose(logits_BxV, step, key, row_ids_B, temperature, top_p, min_new):
    banned_V = None
    if stop_ids:
      banned_V = jnp.zeros((V,), bool).at[stops].set(True, mode="drop")
    ban_B = jnp.broadcast_to(step < min_new, row_ids_B.shape)
    keys_B = sampling.row_keys(key, step, row_ids_B)
    return sampling.select(logits_BxV, keys_B, temperature=temperature, top_p=top_p, banned_V=banned_V,
                           ban_B=ban_B, greedy=greedy, top_k=top_k, nucleus=nucleus)

  def prefill(state, tokens_BxP, segments_BxP, positions_BxP):
    _TRACES[("prefill",) + trace_key] += 1
    model = nnx.merge(graphdef, state)
    cache = constrain_cache(KVCache.zeros(config, batch, length, cache_dtype))
    hidden_BxPxD, cache = model.hidden_states(tokens_BxP, positions_BxP, segments_BxP, cache=cache,
                                               fresh_cache=True)
    # Left padding puts every row's last prompt token in the last slot: only its logits are needed
    # (the full [B, P, V] float32 block would be gigabytes at ReasonRank's 5.7k-token prompts).
    logits_BxV = model.logits(hidden_BxPxD[:, -1:])[:, 0]
    return constrain_cache(cache), logits_BxV

  def decode(state, cache, logits_BxV, next_pos_B, active_B, row_ids_B, key, temperature, top_p, max_new,
             min_new):
    _TRACES[("decode",) + trace_key] += 1
    model = nnx.merge(graphdef, state)
    tok_B, lp_B = choose(logits_BxV, 0, key, row_ids_B, temperature, top_p, min_new)
    tok_B = jnp.where(active_B, tok_B, 0)
    out_tokens_BxN = jnp.zeros((batch, new), jnp.int32).at[:, 0].set(tok_B)
    out_lp_BxN = jnp.zeros((batch, new), jnp.float32).at[:, 0].set(jnp.where(active_B, lp_B, 0.0))
    out_logits = jnp.zeros((batch, new, V), jnp.float32).at[:, 0].set(logits_BxV) if return_logits else None
    lengths_B = active_B.astype(jnp.int32)
    stopped_B = active_B & jnp.isin(tok_B, stops)
    done_B = ~active_B | stopped_B | (max_new <= 1)
    carry = (cache, tok_B, next_pos_B, out_tokens_BxN, out_lp_BxN, out_logits, lengths_B, stopped_B, done_B,
             jnp.int32(1))

    def cond(carry):
      *_, done_B, step = carry
      return (step < max_new) & ~jnp.all(done_B)

    def body(carry):
      cache, tok_B, pos_B, out_tokens_BxN, out_lp_BxN, out_logits, lengths_B, stopped_B, done_B, step = carry
      live_B = ~done_B
      logits_Bx1xV, cache = model(tok_B[:, None], pos_B[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
      logits_BxV = logits_Bx1xV[:, 0]
      new_B, lp_B = choose(logits_BxV, step, key, row_ids_B, temperature, top_p, min_new)
      new_B = jnp.where(live_B, new_B, 0)
      out_tokens_BxN = jax.lax.dynamic_update_index_in_dim(out_tokens_BxN, new_B, step, 1)
      out_lp_BxN = jax.lax.dynamic_update_index_in_dim(out_lp_BxN, jnp.where(live_B, lp_B, 0.0), step, 1)
      if out_logits is not None:
        out_logits = jax.lax.dynamic_update_index_in_dim(out_logits, logits_BxV, step, 1)
      lengths_B = lengths_B + live_B
      stopped_B = stopped_B | (live_B & jnp.isin(new_B, stops))
      done_B = done_B | stopped_B | (step + 1 >= max_new)
      return (constrain_cache(cache), new_B, pos_B + 1, out_tokens_BxN, out_lp_BxN, out_logits, lengths_B,
              stopped_B, done_B, step + 1)

    carry = jax.lax.while_loop(cond, body, carry)
    cache, _, _, out_tokens_BxN, out_lp_BxN, out_logits, lengths_B, stopped_B, _, _ = carry
    # Returning the cache lets the donated input buffer alias the loop's carry (updated in place, never
    # copied); the caller drops it.
    return (out_tokens_BxN, out_lp_BxN, lengths_B, stopped_B, out_logits), cache

  if mesh is None:
    return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))
  cache_sh = _cache_shardings(mesh, config, batch, length)
  return (jax.jit(prefill, out_shardings=(cache_sh, _named(mesh, ("batch", "vocab"), (batch, V)))),
          jax.jit(decode, donate_argnums=(1,), out_shardings=(None, cache_sh)))


# ---------------------------------------------------------------- memory


def _device_limit(devices) -> int | None:
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def _shard_bytes(shape, dtype, sharding) -> int:
  shard = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
  return math.prod(shard) * jnp.dtype(dtype).itemsize


def estimate_memory(model: Qwen2, batch: int, prompt_len: int, new_tokens: int, *, cache_dtype=None,
                    mesh: Mesh | None = None, memory_limit_bytes: int | None = None) -> MemoryEstimate:
  """Per-device bytes for a decode call of `batch` rows, `prompt_len` prompt and `new_tokens` new slots,
  computed from shapes and shardings before anything is allocated. Activations are the prefill peak of
  one layer (layers run one at a time): attention scores and probabilities in float32 (prompt x prompt, as
  prefill attends only to itself), the MLP, and the last-position logits."""
  c = model.config
  cache_dtype = cache_dtype or default_cache_dtype(c)
  state = nnx.state(model)
  if mesh is not None:
    shardings = jax.tree.leaves(sharding_lib.state_shardings(state, mesh))
    weights = sum(_shard_bytes(x.shape, x.dtype, s) for x, s in zip(jax.tree.leaves(nnx.to_pure_dict(state)),
                                                                      shardings))
  else:
    weights = sum(_shard_bytes(x.shape, x.dtype, getattr(x, "sharding", None))
                  for x in jax.tree.leaves(nnx.to_pure_dict(state)))
  length = prompt_len + new_tokens
  if mesh is not None:
    cache_sh = _cache_shardings(mesh, c, batch, length)
    kv_shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
    cache = 2 * _shard_bytes(kv_shape, cache_dtype, cache_sh.k_LxBxSxKxH) + \
        _shard_bytes((batch, length), jnp.int32, cache_sh.segment_BxS)
  else:
    cache = KVCache.nbytes(c, batch, length, cache_dtype) + batch * length * 4
  rows = -(-batch // _data_shards(mesh))
  tensor = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1) if mesh is not None else 1
  heads = c.num_heads // tensor if c.num_heads % tensor == 0 else c.num_heads
  item = jnp.dtype(c.dtype).itemsize
  # Prefill attends the prompt to itself: XLA materialises P x P scores; the fused kernels work in tiles.
  fused = c.attention in ("cudnn", "splash") or (c.attention == "auto" and hardware.platform() != "cpu")
  score_cols = min(prompt_len, 512) if fused else prompt_len
  act = rows * (2 * heads * prompt_len * score_cols * 4  # scores + probs
                + prompt_len * (3 * c.intermediate_size + 4 * c.hidden_size) * item
                + 2 * c.vocab_size * 4)
  if memory_limit_bytes is None:
    devices = mesh.devices.flat if mesh is not None else [jax.local_devices()[0]]
    memory_limit_bytes = _device_limit(list(devices))
  return MemoryEstimate(int(weights), int(cache), int(act), memory_limit_bytes)


def _check_memory(model, batch, prompt_len, new_tokens, cache_dtype, mesh, memory_limit_bytes, multiple):
  est = estimate_memory(model, batch, prompt_len, new_tokens, cache_dtype=cache_dtype, mesh=mesh,
                        memory_limit_bytes=memory_limit_bytes)
  if est.fits:
    return est
  suggestion = None
  b = batch
  while b > multiple:
    b = max(multiple, (b // 2) // multiple * multiple)
    if estimate_memory(model, b, prompt_len, new_tokens, cache_dtype=cache_dtype, mesh=mesh,
                       memory_limit_bytes=est.limit).fits:
      suggestion = b
      break
  hint = (f"try batch_size={suggestion}" if suggestion else
          "even the smallest batch does not fit: use more devices (fsdp/tensor), a smaller cache_dtype, "
          "or shorter prompts / fewer new tokens")
  raise DecodeMemoryError(f"generate: batch {batch} x {prompt_len} prompt + {new_tokens} new-token slots "
                          f"(cache {cache_dtype}) needs {est.describe()}; {hint}")


# ---------------------------------------------------------------- generate


def generate(model: Qwen2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, seed: int = 0,
             stop_ids: Sequence[int] | None = None, mesh: Mesh | None = None, batch_size: int | None = None,
             buckets: Buckets = Buckets(), cache_dtype: str | None = None,
             memory_limit_bytes: int | None = None, return_logits: bool = False) -> Generation:
  """Generates up to `max_new_tokens` ids after each prompt (token-id lists of any lengths).

  temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature) after top-k and
  top-p. Row i's random stream depends only on (seed, i, step). A row stops after emitting one of
  `stop_ids` (default: the Qwen2.5 tokenizer's, <|endoftext|> and <|im_end|>; pass () to never stop); the
  stop id is included in its tokens. Stop ids are banned until `min_new_tokens` tokens exist.
  `batch_size` splits the prompts into calls of at most that many rows (sorted by length, so rows of
  similar length share a call); by default all rows run at once. With `mesh`, weights are placed per the
  model's logical-axis rules and the batch is split over the data axes. Raises DecodeMemoryError when the
  estimated per-device memory exceeds the device limit (or `memory_limit_bytes`).
  """
  config: Qwen2Config = model.config
  prompts = [list(map(int, p)) for p in prompts]
  settings = sampling.Sampling(float(temperature), int(top_k), float(top_p))
  if max_new_tokens < 0 or min_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} and min_new_tokens={min_new_tokens} must be >= 0")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty")
    if min(p) < 0 or max(p) >= config.vocab_size:
      raise ValueError(f"prompt {i} has a token id outside [0, {config.vocab_size})")
  if stop_ids is None:
    from rrjax import tokenizer as tokenizer_lib
    stop_ids = tokenizer_lib.load().stop_ids
  stop_ids = tuple(sorted({int(s) for s in stop_ids}))
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(config)))
  if not prompts or max_new_tokens == 0:
    n = len(prompts)
    return Generation([[] for _ in range(n)], [[] for _ in range(n)], [0] * n, ["length"] * n,
                      [np.zeros((0, config.vocab_size), np.float32) for _ in range(n)] if return_logits else None)

  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = jax.device_put(params, sharding_lib.state_shardings(state, mesh))

  order = list(range(len(prompts)))
  chunk = batch_size or len(prompts)
  if chunk < len(prompts):
    order.sort(key=lambda i: -len(prompts[i]))
  results: dict[int, tuple] = {}
  for start in range(0, len(order), chunk):
    rows = order[start:start + chunk]
    out = _generate_batch(graphdef, params, model, config, [prompts[i] for i in rows], rows, settings,
                          max_new_tokens, min_new_tokens, seed, stop_ids, mesh, buckets, cache_dtype,
                          memory_limit_bytes, return_logits)
    results.update(zip(rows, out))
  rows = [results[i] for i in range(len(prompts))]
  return Generation(tokens=[r[0] for r in rows], logprobs=[r[1] for r in rows], lengths=[r[2] for r in rows],
                    finish_reasons=[r[3] for r in rows],
                    logits=[r[4] for r in rows] if return_logits else None)


def programs(model: Qwen2, num_prompts: int, prompt_len: int, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), mesh: Mesh | None = None,
             batch_size: int | None = None, buckets: Buckets = Buckets(), cache_dtype: str | None = None,
             return_logits: bool = False) -> list[tuple[str, object, tuple]]:
  """The hook for ahead-of-time builds (rrjax.preflight): `[(name, jitted program, abstract arguments)]` of
  the programs `generate` runs for `num_prompts` prompts of up to `prompt_len` tokens with these settings,
  bucketed as `generate` buckets them. `model` may be abstract (ShapeDtypeStruct leaves on their shardings).
  `program.lower(*arguments).compile()` builds exactly what `generate` would run; nothing is allocated."""
  config: Qwen2Config = model.config
  settings = sampling.Sampling(float(temperature), int(top_k), float(top_p))
  stop_ids = tuple(sorted({int(s) for s in stop_ids}))
  cache_dtype = str(jnp.dtype(cache_dtype or default_cache_dtype(config)))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                          sharding_lib.state_shardings(state, mesh))
  B = buckets.batch(min(batch_size or num_prompts, num_prompts), _data_shards(mesh))
  P, N = buckets.prompt(prompt_len), buckets.new_tokens(max_new_tokens)
  prefill, decode = _programs(graphdef, config, mesh, B, P, N, cache_dtype, stop_ids, settings.static_key(),
                              return_logits)

  def arg(shape, dtype, names=None):
    sharding = _named(mesh, names, shape) if mesh is not None and names else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  rows = lambda dtype: arg((B, P), dtype, ("batch", "length"))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    cache, _ = jax.eval_shape(prefill, params, rows(jnp.int32), rows(jnp.int32), rows(jnp.int32))
  if mesh is not None:
    cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                         _cache_shardings(mesh, config, B, P + N))
  key = jax.eval_shape(lambda: jax.random.key(0))
  scalars = (key, arg((), jnp.float32), arg((), jnp.float32), arg((), jnp.int32), arg((), jnp.int32))
  per_row = lambda dtype: arg((B,), dtype, ("batch",))
  return [("rollout_prefill", prefill, (params, rows(jnp.int32), rows(jnp.int32), rows(jnp.int32))),
          ("rollout_decode", decode, (params, cache, arg((B, config.vocab_size), jnp.float32, ("batch", "vocab")),
                                      per_row(jnp.int32), per_row(jnp.bool_), per_row(jnp.int32), *scalars))]


def _generate_batch(graphdef, params, model, config, prompts, row_ids, settings, max_new_tokens,
                    min_new_tokens, seed, stop_ids, mesh, buckets, cache_dtype, memory_limit_bytes,
                    return_logits):
  n = len(prompts)
  multiple = _data_shards(mesh)
  B = buckets.batch(n, multiple)
  P = buckets.prompt(max(len(p) for p in prompts))
  N = buckets.new_tokens(max_new_tokens)
  _check_memory(model, B, P, N, cache_dtype, mesh, memory_limit_bytes, multiple)

  tokens = np.zeros((B, P), np.int32)
  segments = np.zeros((B, P), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, P - len(p):] = p
    segments[r, P - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  next_pos = segments.sum(axis=1).astype(np.int32)
  active = np.arange(B) < n
  ids = np.zeros((B,), np.int32)
  ids[:n] = row_ids

  prefill, decode = _programs(graphdef, config, mesh, B, P, N, cache_dtype, stop_ids, settings.static_key(),
                              return_logits)
  scalars = (jax.random.key(seed), jnp.float32(settings.temperature or 1.0), jnp.float32(settings.top_p),
             jnp.int32(max_new_tokens), jnp.int32(min_new_tokens))
  if mesh is None:
    cache, logits = prefill(params, tokens, segments, positions)
    out = decode(params, cache, logits, next_pos, active, ids, *scalars)
  else:
    put = lambda x, names: jax.device_put(x, _named(mesh, names, x.shape))
    with jax.set_mesh(mesh):
      cache, logits = prefill(params, put(tokens, ("batch", "length")), put(segments, ("batch", "length")),
                              put(positions, ("batch", "length")))
      out = decode(params, cache, logits, put(next_pos, ("batch",)), put(active, ("batch",)),
                   put(ids, ("batch",)), *scalars)
  out, cache = out
  del cache
  out_tokens, out_lp, lengths, stopped, out_logits = jax.device_get(out)
  results = []
  for r in range(n):
    k = int(lengths[r])
    results.append((out_tokens[r, :k].tolist(), out_lp[r, :k].tolist(), k, "stop" if stopped[r] else "length",
                    None if out_logits is None else np.asarray(out_logits[r, :k])))
  return results
