"""Train state as plain pytrees: trainable params, frozen params, optimizer state, step and RNG.

Parameters are pure dicts (what `nnx.to_pure_dict` gives), so Orbax saves and restores them as ordinary
pytrees and `nnx.merge(graphdef, params, frozen)` rebuilds the model inside jit. Under LoRA the trainable
params are the adapters and `frozen` holds the base weights (shared with the GRPO reference policy).

Shapes and shardings of the whole state are known before anything is allocated (`StateLayout`), so a
resume restores every shard straight onto its device and never builds the model first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import sharding as sharding_lib
from rrjax.model import lora as lora_lib


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # trainable parameters (pure dict)
  frozen: Any  # non-trainable parameters (pure dict; empty for full fine-tuning)
  opt_state: Any
  rng: jax.Array  # uint32 key data, split every step


def split_model(model: nnx.Module):
  """(graphdef, trainable state, frozen state) as nnx.State objects."""
  return nnx.split(model, lora_lib.trainable(model.config), ...)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Everything about the train state that is known without allocating it."""

  graphdef: Any
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings
  mesh: Mesh

  @property
  def shardings(self) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, self.abstract)


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def optimizer_layout(tx: optax.GradientTransformation, p_abs: Any, mesh: Mesh) -> Any:
  """The optimizer state's ShapeDtypeStructs: every copy of the parameter tree inside it (AdamW's m and v)
  on its parameter's sharding, everything else (counts, scalars) replicated. Compiling `tx.init` instead
  would replicate the moments: their zeros do not depend on the parameters' data."""
  shapes = jax.eval_shape(tx.init, p_abs)
  rep = _replicated(mesh)
  return optax.tree_map_params(
      tx, lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), shapes, p_abs,
      transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep))


def layout(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
  """Shapes from `nnx.eval_shape(model_fn)`, parameter shardings from the logical-axis rules, optimizer
  state shardings from the parameters' (`optimizer_layout`)."""
  abstract_model = nnx.eval_shape(model_fn)
  graphdef, p_abs, f_abs = sharding_lib.abstract_state(abstract_model, mesh,
                                                       lora_lib.trainable(abstract_model.config), ...)
  o_abs = optimizer_layout(tx, p_abs, mesh)
  rep = _replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), p_abs, f_abs, o_abs,
                        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))
  return StateLayout(graphdef, abstract, mesh)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, lay: StateLayout, seed: int) -> TrainState:
  """A fresh state from a built model (random init or imported weights), placed on the layout."""
  _, trainable, frozen = split_model(model)
  shardings = lay.shardings
  params = jax.device_put(nnx.to_pure_dict(trainable), shardings.params)
  frozen = jax.device_put(nnx.to_pure_dict(frozen), shardings.frozen)
  with jax.set_mesh(lay.mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, frozen, opt_state, rng)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation) -> TrainState:
  """One optimizer update of the trainable params; the step counts updates and the RNG advances."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
  return TrainState(state.step + 1, params, state.frozen, opt_state, rng)


def model_from_state(lay: StateLayout, state: TrainState) -> nnx.Module:
  return nnx.merge(lay.graphdef, state.params, state.frozen)


def micro_batches(batch: Any, steps: int, shards: int = 1) -> Any:
  """Splits every [N, ...] array of `batch` into `steps` micro-batches, [steps, N / steps, ...], such that each
  of the `shards` data shards (contiguous blocks of N / shards rows) feeds every micro-batch equally from its
  own rows: micro-batch k holds the k-th run of rows of each shard, so no row changes device."""

  def split(x):
    n = x.shape[0]
    if n % (steps * shards):
      raise ValueError(f"{n} rows do not split into {steps} micro-batches over {shards} data shards")
    x = x.reshape(shards, steps, n // (steps * shards), *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(steps, n // steps, *x.shape[3:])

  return jax.tree.map(split, batch)


def unmicro_batches(micro: Any, shards: int = 1) -> Any:
  """The inverse of `micro_batches`: [steps, N / steps, ...] back to [N, ...] in the original row order."""

  def join(x):
    steps, m = x.shape[:2]
    x = x.reshape(steps, shards, m // shards, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(steps * m, *x.shape[3:])

  return jax.tree.map(join, micro)


def scan_gradients(fn: Callable, params: Any, micro: Any):
  """Sums `fn(params, micro_batch) -> (scalar, aux dict of scalars)` and its gradient over the leading axis of
  `micro` (a scan: one micro-batch's activations at a time). Returns (sum, aux sums, gradient sum)."""
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  first = jax.tree.map(lambda x: x[0], micro)
  aux_shape = jax.eval_shape(fn, params, first)[1]

  def body(carry, mb):
    total, aux, grads = carry
    (value, a), g = grad_fn(params, mb)
    return (total + value, jax.tree.map(jnp.add, aux, a), jax.tree.map(jnp.add, grads, g)), None

  zeros = (jnp.float32(0), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
           jax.tree.map(jnp.zeros_like, params))
  (total, aux, grads), _ = jax.lax.scan(body, zeros, micro)
  return total, aux, grads
