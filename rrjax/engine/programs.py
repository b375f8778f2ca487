"""The engine's compiled programs: prefill (a group of prompts into slots), insert (a prefilled group's first
tokens and slot state) and decode (up to K steps of every slot, leaving as soon as a row finishes).

Each program is compiled ahead of time (`jit(...).lower(...).compile()`) once per shape key and kept; the
count of compiles is `compilation_count()`. Shapes: B slots, S positions per slot, G prefill rows, P prompt
positions (bucketed), C copies of a prompt (slots one prefill is inserted into), n = G * C, M stop ids per
slot, K decode steps per call, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import sampling
from rrjax import sharding as sharding_lib
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import KVCache, Qwen2Config, SlotCache

_TRACES: collections.Counter = collections.Counter()
PREFILL_PHASES = 4  # loops of a chunked prefill, each with its own key length (see prefill_fn)


def compilation_count() -> int:
  """Engine programs compiled since the process started."""
  return sum(_TRACES.values())


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


class SlotState(NamedTuple):
  """What each slot decodes, on device. A slot holds `lengths` keys; `tokens` is its next input (sampled,
  not yet in the cache), the `steps`-th token of its request."""

  lengths_B: jax.Array
  tokens_B: jax.Array
  steps_B: jax.Array
  budget_B: jax.Array  # the request's max_new_tokens
  min_new_B: jax.Array
  request_B: jax.Array  # the request (copy) id: sampling keys fold (seed, request, token index)
  seed_B: jax.Array
  temperature_B: jax.Array
  top_p_B: jax.Array
  stops_BxM: jax.Array  # stop ids, padded with V (never a token)
  active_B: jax.Array

  @classmethod
  def zeros(cls, slots: int, stop_slots: int, vocab: int) -> SlotState:
    i = lambda: jnp.zeros((slots,), jnp.int32)
    return cls(i(), i(), i(), i(), i(), i(), i(), jnp.zeros((slots,), jnp.float32), jnp.ones((slots,), jnp.float32),
               jnp.full((slots, stop_slots), vocab, jnp.int32), jnp.zeros((slots,), bool))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the programs of one engine share: the model, mesh, cache shape and layout, sampling structure."""

  graphdef: object
  config: Qwen2Config
  mesh: Mesh | None
  slots: int
  length: int
  cache_dtype: str
  kernel: str  # attention.slot_kernel's choice for decode
  sampling: tuple[bool, int, bool, float]  # Sampling.static_key(): (greedy, top_k, nucleus, min_p)
  stop_slots: int = 8
  steps: int = 64
  return_logits: bool = False
  cache_layout: str | None = None  # default: the kernel's (attention.slot_layout)

  def __hash__(self):
    # Hashed once: a spec keys every program lookup, and hashing its graphdef and config walks them (about
    # 3 ms of host time in each generate call before this).
    if "_hash" not in self.__dict__:
      object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self))))
    return self.__dict__["_hash"]

  @property
  def layout(self) -> str:
    return self.cache_layout or attention_lib.slot_layout(self.kernel)


# ---------------------------------------------------------------- shardings


def named(mesh: Mesh, names, shape) -> NamedSharding:
  return NamedSharding(mesh, sharding_lib.logical_spec(names, shape, sharding_lib.mesh_sizes(mesh)))


def cache_names(spec: Spec) -> tuple[str | None, ...]:
  """The logical names of the slot cache's dims (of k, and of v when split)."""
  if spec.layout == "paged":  # only whole (key, value) pairs per device
    whole = spec.config.num_kv_heads % sharding_lib.mesh_sizes(spec.mesh).get("tensor", 1) == 0
    return ("layers", "batch", "cache_length", "kv_heads" if whole else None, "head_dim")
  return SlotCache.logical_axes().k


def cache_shardings(spec: Spec) -> SlotCache:
  c, mesh = spec.config, spec.mesh
  L, K, H = c.num_layers, c.num_kv_heads, c.head_dim
  if spec.layout == "paged":
    return SlotCache(named(mesh, cache_names(spec), (L, spec.slots, spec.length, 2 * K, H)), None)
  shape = (L, spec.slots, spec.length, K, H)
  axes = SlotCache.logical_axes()
  return SlotCache(named(mesh, axes.k, shape), named(mesh, axes.v, shape))


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def zeros_cache(spec: Spec) -> SlotCache:
  """The slot cache, allocated straight onto its shardings (one compiled program per spec, kept)."""
  return _zeros_program(spec, "cache")()


def zeros_state(spec: Spec) -> SlotState:
  return _zeros_program(spec, "state")()


def _zeros_program(spec: Spec, what: str):
  # Kept with the spec's other programs: a fresh jit of a fresh function is a compile, which was most of a
  # short generate call.
  if what == "cache":
    make = lambda: SlotCache.zeros(spec.config, spec.slots, spec.length, spec.cache_dtype, spec.layout)
    out = None if spec.mesh is None else cache_shardings(spec)
  else:
    make = lambda: SlotState.zeros(spec.slots, spec.stop_slots, spec.config.vocab_size)
    out = None if spec.mesh is None else _replicated(spec.mesh)
  programs = Programs(spec)
  return programs._get(("zeros", what), lambda: programs._compile((make, (), (), out)))


# ---------------------------------------------------------------- sampling


def _choose(spec: Spec, logits_BxV, state: SlotState, index_B):
  """The next token of each row, with (seed, request, index) keys and stop ids banned before min_new."""
  B, V = logits_BxV.shape
  greedy, top_k, nucleus, min_p = spec.sampling
  rows_Bx1 = jnp.arange(B)[:, None]
  banned_BxV = jnp.zeros((B, V), bool).at[rows_Bx1, state.stops_BxM].set(True, mode="drop")
  keys_B = sampling.request_keys(state.seed_B, state.request_B, index_B)
  return sampling.select(logits_BxV, keys_B, temperature=state.temperature_B, top_p=state.top_p_B,
                         banned_V=banned_BxV, ban_B=index_B < state.min_new_B, greedy=greedy, top_k=top_k,
                         nucleus=nucleus, min_p=min_p)


def _is_stop(tokens_B, stops_BxM):
  return jnp.any(tokens_B[:, None] == stops_BxM, axis=-1)


# ---------------------------------------------------------------- program bodies


def _scatter_rows(caches, rows, lengths_R, dest_RxC, offset, P: int):
  """Each row r of `rows` [L, R, >= P, ...], its first P positions with those from lengths[r] on zeroed (finite
  values, whatever the kernel made of them), into slots dest[r, :] - offset of the matching cache [L, B, S, ...]
  (slots outside [0, B) are skipped). Zeroing here, fused into the writes, keeps no zeroed copy of the rows."""
  B = caches[0].shape[1]
  local_RxC = dest_RxC - offset
  # Mapped to B explicitly: a negative index would wrap around rather than drop.
  local_RxC = jnp.where((local_RxC >= 0) & (local_RxC < B), local_RxC, B)
  keep = (jnp.arange(P)[None] < lengths_R[:, None])[None, :, :, None, None]
  out = []
  for cache, x in zip(caches, rows):
    x = jnp.where(keep, x[:, :, :P], 0).astype(cache.dtype)
    for j in range(dest_RxC.shape[1]):
      cache = cache.at[:, local_RxC[:, j], :P].set(x, mode="drop")
    out.append(cache)
  return tuple(out)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _place(spec: Spec, caches, rows, lengths_G, dest_GxC, P: int):
  """The prefill's rows [L, G, >= P, ...] (prompts of lengths[g]) into their slots dest[g, :] of the caches
  [L, B, S, ...] (see _scatter_rows).

  On a mesh the rows are sharded over the batch axes like the slots, and a scatter to data-dependent slots
  would make XLA all-gather every row's prefix onto every device (for a 32B model's 24k-token prompts, 8
  rows were 51 GB per chip). Instead the rows go round a ring of the devices that hold different rows: at
  each step every device writes the rows it holds into its own slots and passes them on, so a device holds
  its own rows and the ones arriving rather than every device's (the traffic is the all-gather's)."""
  if spec.mesh is None:
    return _scatter_rows(caches, rows, lengths_G, dest_GxC, 0, P)
  sizes = sharding_lib.mesh_sizes(spec.mesh)
  pad = lambda spec_: tuple(spec_) + (None,) * (caches[0].ndim - len(spec_))
  cache_spec = pad(cache_shardings(spec).k.spec)
  # The rows' own spec: the cache's logical names over the rows' shape (G rows may shard over fewer axes).
  row_spec = pad(sharding_lib.logical_spec(cache_names(spec), rows[0].shape, sizes))
  ring, slot_axes = _axes(row_spec[1]), _axes(cache_spec[1])
  n = math.prod(sizes[a] for a in ring)
  if n <= 2 or cache_spec[2] is not None or row_spec[:1] + row_spec[2:] != cache_spec[:1] + cache_spec[2:]:
    # Left to XLA (which gathers the rows, zeroed first as they are fewer than the gathered ones): over two
    # devices the gather holds no more than the ring would (a device's rows and the ones arriving); positions
    # split across devices would not line up (P and S); other dims sharded unlike the cache.
    keep = (jnp.arange(P)[None] < lengths_G[:, None])[None, :, :, None, None]
    rows = tuple(jnp.where(keep, x[:, :, :P], 0) for x in rows)
    return _scatter_rows(caches, rows, lengths_G, dest_GxC, 0, P)
  PS = PartitionSpec

  def local(caches, rows, lengths_G, dest_GxC):
    R, B = rows[0].shape[1], caches[0].shape[1]
    me = jax.lax.axis_index(ring) if ring else 0
    offset = jax.lax.axis_index(slot_axes) * B if slot_axes else 0

    def put(t, caches, rows):
      # At step t a device holds the rows of the device t places before it on the ring.
      first = ((me - t) % n) * R
      at = lambda x: jax.lax.dynamic_slice_in_dim(x, first, R, axis=0)
      return _scatter_rows(caches, rows, at(lengths_G), at(dest_GxC), offset, P)

    def step(t, carry):
      caches, rows = carry
      caches = put(t, caches, rows)
      return caches, tuple(jax.lax.ppermute(x, ring, [(i, (i + 1) % n) for i in range(n)]) for x in rows)

    # Two steps per iteration: a one-step body passes on the rows it carries into the carry's own buffer, so
    # XLA copies them first (a third set of rows); here the second transfer lands where the first one's rows
    # were. A loop, not unrolled steps, so that XLA's scheduler cannot start every transfer at once.
    carry = jax.lax.fori_loop(0, (n - 1) // 2, lambda i, c: step(2 * i + 1, step(2 * i, c)), (caches, rows))
    if (n - 1) % 2:
      carry = step(n - 2, carry)
    return put(n - 1, *carry)

  specs = tuple(PS(*cache_spec) for _ in caches), tuple(PS(*row_spec) for _ in rows)
  fn = jax.shard_map(local, mesh=spec.mesh, in_specs=(*specs, PS(), PS()), out_specs=specs[0], check_vma=False)
  return fn(tuple(caches), tuple(rows), lengths_G, dest_GxC)


def prefill_fn(spec: Spec, rows: int, prompt: int, copies: int, chunk: int | None):
  """(params, cache, tokens [G, P], lengths [G], dest [G, C]) -> (cache, logits [G, V]): prefills G
  right-padded prompts and places each row's keys/values into slots dest[g, :] (ids >= B are skipped)."""
  c = spec.config
  trace_key = ("prefill", spec.slots, spec.length, rows, prompt, copies, chunk, spec.layout)

  def prefill(params, cache: SlotCache, tokens_GxP, lengths_G, dest_GxC):
    _TRACES[trace_key] += 1
    model = nnx.merge(spec.graphdef, params)
    G, P = tokens_GxP.shape
    pos_P = jnp.arange(P, dtype=jnp.int32)
    real_GxP = pos_P[None] < lengths_G[:, None]
    if chunk is None or chunk >= P:
      empty = KVCache.zeros(c, G, P, spec.cache_dtype)
      hidden_GxPxD, prefix = model.hidden_states(tokens_GxP, jnp.broadcast_to(pos_P, (G, P)), real_GxP,
                                                 cache=empty, fresh_cache=True, lengths_B=lengths_G)
      last_GxD = jnp.take_along_axis(hidden_GxPxD, (lengths_G - 1)[:, None, None], axis=1)[:, 0]
      k, v = prefix.k_LxBxSxKxH, prefix.v_LxBxSxKxH
    else:
      # Long prompts in chunks: each chunk attends to the keys before it (XLA scores [G, N, chunk, S]). The
      # chunks run in PREFILL_PHASES loops, each reading keys up to its last chunk's end (S), so attention
      # computes about (1 + 1 / phases) / 2 of the square rather than all of it.
      n = -(-P // chunk)
      tokens = jnp.pad(tokens_GxP, ((0, 0), (0, n * chunk - P)))
      ends = sorted({-(-n * (j + 1) // PREFILL_PHASES) for j in range(PREFILL_PHASES)})

      def step(i, carry, keys):
        prefix, last_GxD = carry
        start = i * chunk
        part_GxT = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        hidden_GxTxD, prefix = model.extend(part_GxT, prefix, jnp.full((G,), start, jnp.int32), kernel="xla",
                                            keys=keys)
        at_G = lengths_G - 1 - start
        here_G = (at_G >= 0) & (at_G < chunk)
        row_GxD = jnp.take_along_axis(hidden_GxTxD, jnp.clip(at_G, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        return prefix, jnp.where(here_G[:, None], row_GxD, last_GxD)

      # The prefix in the slot cache's layout: no second copy of the prompt's keys and values to interleave.
      prefix = SlotCache.zeros(c, G, n * chunk, spec.cache_dtype, spec.layout)
      carry = (prefix, jnp.zeros((G, c.hidden_size), c.dtype))
      for start, end in zip([0] + ends, ends):
        carry = jax.lax.fori_loop(start, end, functools.partial(step, keys=end * chunk), carry)
      prefix, last_GxD = carry
      k, v = prefix  # [.., n * chunk, ..]: _place takes the first P positions
    logits_GxV = model.logits(last_GxD[:, None])[:, 0]
    # In the cache's dtype before they travel (padding is zeroed as they are written: _place).
    k, v = (x if x is None else x.astype(cache.k.dtype) for x in (k, v))
    if spec.layout == "paged":
      kv = k if v is None else jnp.stack([k, v], axis=-2).reshape(*k.shape[:3], 2 * k.shape[3], k.shape[4])
      (new_k,) = _place(spec, (cache.k,), (kv,), lengths_G, dest_GxC, P)
      return SlotCache(new_k, None), logits_GxV
    new_k, new_v = _place(spec, (cache.k, cache.v), (k, v), lengths_G, dest_GxC, P)
    return SlotCache(new_k, new_v), logits_GxV

  return prefill


class Inserted(NamedTuple):
  """The slots a prefilled group is inserted into, one entry per slot (n = G * C): which prompt row of the
  group fills it, and the request's settings."""

  src_n: jax.Array  # the prefill row (its logits sample the first token)
  dest_n: jax.Array  # the slot (>= B: skipped)
  lengths_n: jax.Array  # prompt length
  request_n: jax.Array
  seed_n: jax.Array
  temperature_n: jax.Array
  top_p_n: jax.Array
  budget_n: jax.Array
  min_new_n: jax.Array
  stops_nxM: jax.Array

  @classmethod
  def empty(cls, n: int, spec: Spec) -> Inserted:
    """Host buffers of n entries that insert nothing (slot B, stop ids V), for the engine to fill."""
    i = lambda fill=0: np.full((n,), fill, np.int32)
    return cls(i(), i(spec.slots), i(), i(), i(), np.zeros((n,), np.float32), np.ones((n,), np.float32), i(), i(),
               np.full((n, spec.stop_slots), spec.config.vocab_size, np.int32))


def insert_fn(spec: Spec, rows: int, n: int):
  """(state, logits [G, V], Inserted) -> (state, first tokens [n], logprobs [n], done [n]): samples each
  inserted slot's first token from its prompt's logits and sets the slot up."""
  trace_key = ("insert", spec.slots, rows, n, spec.stop_slots, spec.sampling)

  def insert(state: SlotState, logits_GxV, new: Inserted):
    _TRACES[trace_key] += 1
    zeros_n = jnp.zeros_like(new.src_n)
    slot = SlotState(new.lengths_n, zeros_n, zeros_n, new.budget_n, new.min_new_n, new.request_n, new.seed_n,
                     new.temperature_n, new.top_p_n, new.stops_nxM, jnp.ones_like(new.src_n, bool))
    tok_n, lp_n = _choose(spec, logits_GxV[new.src_n], slot, zeros_n)
    done_n = _is_stop(tok_n, new.stops_nxM) | (new.budget_n <= 1)
    slot = slot._replace(tokens_B=tok_n, steps_B=jnp.ones_like(zeros_n), active_B=~done_n)
    state = SlotState(*(s.at[new.dest_n].set(x, mode="drop") for s, x in zip(state, slot)))
    return state, tok_n, lp_n, done_n

  return insert


class DecodeCarry(NamedTuple):
  """The decode loop's state, and what a decode call returns: the cache and slots after the call, per slot
  the tokens [B, K], logprobs and (when kept) logits [B, K, V] it emitted, how many, whether it finished
  (stopped or reached its budget) or stopped; and the steps taken."""

  cache: SlotCache
  state: SlotState
  tokens_BxK: jax.Array
  logprobs_BxK: jax.Array
  logits_BxKxV: jax.Array | None
  emitted_B: jax.Array
  finished_B: jax.Array
  stopped_B: jax.Array
  step: jax.Array


def decode_fn(spec: Spec):
  """(params, cache, state, limit, leave_early) -> DecodeCarry: up to `limit` (<= K) steps of every active
  slot; with `leave_early`, the call returns after the step in which any row stops or reaches its budget."""
  c, B, K = spec.config, spec.slots, spec.steps
  trace_key = ("decode", B, spec.length, K, spec.stop_slots, spec.sampling, spec.return_logits, spec.layout)

  def decode(params, cache: SlotCache, state: SlotState, limit, leave_early) -> DecodeCarry:
    _TRACES[trace_key] += 1
    model = nnx.merge(spec.graphdef, params)
    zeros_B = jnp.zeros((B,), bool)
    logits = jnp.zeros((B, K, c.vocab_size), jnp.float32) if spec.return_logits else None
    start = DecodeCarry(cache, state, jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32), logits,
                        jnp.zeros((B,), jnp.int32), zeros_B, zeros_B, jnp.int32(0))

    def cond(carry: DecodeCarry):
      return (carry.step < limit) & jnp.any(carry.state.active_B) & ~(leave_early & jnp.any(carry.finished_B))

    def body(carry: DecodeCarry) -> DecodeCarry:
      state, step = carry.state, carry.step
      live_B = state.active_B
      hidden_Bx1xD, cache = model.extend(state.tokens_B[:, None], carry.cache, state.lengths_B, kernel=spec.kernel)
      logits_BxV = model.logits(hidden_Bx1xD)[:, 0]
      tok_B, lp_B = _choose(spec, logits_BxV, state, state.steps_B)
      put = lambda out, x: jax.lax.dynamic_update_index_in_dim(out, x, step, 1)
      logits = carry.logits_BxKxV if carry.logits_BxKxV is None else put(carry.logits_BxKxV, logits_BxV)
      stop_B = live_B & _is_stop(tok_B, state.stops_BxM)
      steps_B = state.steps_B + live_B
      done_B = stop_B | (live_B & (steps_B >= state.budget_B))
      state = state._replace(lengths_B=state.lengths_B + live_B, tokens_B=jnp.where(live_B, tok_B, state.tokens_B),
                             steps_B=steps_B, active_B=state.active_B & ~done_B)
      return DecodeCarry(cache, state, put(carry.tokens_BxK, jnp.where(live_B, tok_B, 0)),
                         put(carry.logprobs_BxK, jnp.where(live_B, lp_B, 0.0)), logits, carry.emitted_B + live_B,
                         carry.finished_B | done_B, carry.stopped_B | stop_B, step + 1)

    return jax.lax.while_loop(cond, body, start)

  return decode


# ---------------------------------------------------------------- compiled programs


def abstract(x, sharding=None):
  """A ShapeDtypeStruct of `x` (an array or a ShapeDtypeStruct), on `sharding` or x's own."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))


class Programs:
  """The compiled programs of one Spec, compiled ahead of time on first use (or by `compile_*`)."""

  _CACHE: collections.OrderedDict = collections.OrderedDict()  # across engines: same spec, same programs
  MAX = 64

  def __init__(self, spec: Spec):
    self.spec = spec

  def _get(self, key, build, spec: Spec | None = None):
    full = (spec or self.spec, key)
    if full not in self._CACHE:
      self._CACHE[full] = build()
      while len(self._CACHE) > self.MAX:
        self._CACHE.popitem(last=False)
    self._CACHE.move_to_end(full)
    return self._CACHE[full]

  def _jit(self, fn, donate, out_shardings):
    if self.spec.mesh is None:
      return jax.jit(fn, donate_argnums=donate)
    return jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings)

  def _compile(self, definition):
    fn, args, donate, out = definition
    jitted = self._jit(fn, donate, out)
    if self.spec.mesh is None:
      return jitted.lower(*args).compile()
    with jax.set_mesh(self.spec.mesh):
      return jitted.lower(*args).compile()

  # -- abstract arguments (what warm-up and ahead-of-time builds lower with)

  def _vec(self, n, dtype, *extra):
    s = self.spec
    sh = None if s.mesh is None else _replicated(s.mesh)
    return jax.ShapeDtypeStruct((n, *extra), dtype, sharding=sh)

  def abstract_cache(self) -> SlotCache:
    s = self.spec
    c = s.config
    kv = (c.num_layers, s.slots, s.length, (2 if s.layout == "paged" else 1) * c.num_kv_heads, c.head_dim)
    shardings = cache_shardings(s) if s.mesh is not None else SlotCache(None, None)
    make = lambda sh: jax.ShapeDtypeStruct(kv, jnp.dtype(s.cache_dtype), sharding=sh)
    return SlotCache(make(shardings.k), None if s.layout == "paged" else make(shardings.v))

  def abstract_state(self) -> SlotState:
    s = self.spec
    B = s.slots
    return SlotState(*(self._vec(B, jnp.int32) for _ in range(7)), self._vec(B, jnp.float32),
                     self._vec(B, jnp.float32), self._vec(B, jnp.int32, s.stop_slots), self._vec(B, bool))

  def _cache_out(self):
    return None if self.spec.mesh is None else cache_shardings(self.spec)

  def _prefill_definition(self, params, rows, prompt, copies, chunk):
    s = self.spec
    args = (jax.tree.map(abstract, params), self.abstract_cache(), self._vec(rows, jnp.int32, prompt),
            self._vec(rows, jnp.int32), self._vec(rows, jnp.int32, copies))
    out = None if s.mesh is None else (cache_shardings(s), _replicated(s.mesh))
    return prefill_fn(s, rows, prompt, copies, chunk), args, (1,), out

  def _insert_spec(self) -> Spec:
    # Slot state and sampling only: the same program serves every cache length and kernel.
    return dataclasses.replace(self.spec, length=0, kernel="xla", steps=0, return_logits=False)

  def _insert_definition(self, rows, n):
    s = self._insert_spec()
    sh = None if s.mesh is None else _replicated(s.mesh)
    new = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), Inserted.empty(n, s))
    args = (self.abstract_state(), self._vec(rows, jnp.float32, s.config.vocab_size), new)
    out = None if s.mesh is None else _replicated(s.mesh)
    return insert_fn(s, rows, n), args, (0,), out

  def _decode_definition(self, params):
    s = self.spec
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=None if s.mesh is None else _replicated(s.mesh))
    args = (jax.tree.map(abstract, params), self.abstract_cache(), self.abstract_state(), scalar(jnp.int32),
            scalar(bool))
    out = None
    if s.mesh is not None:
      r = _replicated(s.mesh)
      out = DecodeCarry(cache_shardings(s), r, r, r, None if not s.return_logits else r, r, r, r, r)
    return decode_fn(s), args, (1, 2), out

  def prefill(self, params, rows: int, prompt: int, copies: int = 1, chunk: int | None = None):
    """The compiled prefill of G=`rows` prompts of P=`prompt` positions; `params` may be abstract."""
    return self._get(("prefill", rows, prompt, copies, chunk),
                     lambda: self._compile(self._prefill_definition(params, rows, prompt, copies, chunk)))

  def insert(self, rows: int, n: int):
    return self._get(("insert", rows, n), lambda: self._compile(self._insert_definition(rows, n)),
                     self._insert_spec())

  def decode(self, params):
    return self._get(("decode",), lambda: self._compile(self._decode_definition(params)))

  def jitted(self, params, rows: int, prompt: int, copies: int = 1, chunk: int | None = None):
    """[(name, jitted program, abstract arguments)] of prefill, insert and decode, for ahead-of-time builds
    elsewhere (`program.lower(*arguments).compile()` under the mesh builds what the engine runs). The
    prefill takes (params, tokens, lengths, dest, cache): the prompt tokens second."""
    prefill_body, args, _, shardings = self._prefill_definition(params, rows, prompt, copies, chunk)
    params_, cache, tokens, lengths, dest = args
    prefill = self._jit(lambda p, t, n, d, c: prefill_body(p, c, t, n, d), (4,), shardings)
    out = [("prefill", prefill, (params_, tokens, lengths, dest, cache))]
    for name, (fn, args, donate, sh) in (("insert", self._insert_definition(rows, rows * copies)),
                                          ("decode", self._decode_definition(params))):
      out.append((name, self._jit(fn, donate, sh), args))
    return out
