"""Device meshes, logical-axis rules and sharded model creation.

Parameters and main activations carry logical axis names ("embed", "mlp", "q_heads", ...). A rule table
maps each logical name to mesh axes ("data", "fsdp", "tensor"). A mesh axis is dropped for a dimension it
does not divide (for example 2 kv heads on tensor=4), so one rule table serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) axes; -1 means "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh: {num_devices} devices are not divisible by {known} ({sizes})")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"have {num_devices}")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


_RULES: contextvars.ContextVar[LogicalRules] = contextvars.ContextVar("rrjax_axis_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: LogicalRules):
  """Overrides the logical-axis rules used by `logical_spec` and `constrain` inside the block."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> LogicalRules:
  return _RULES.get()


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh_axis_sizes: dict[str, int],
                 rules: LogicalRules | None = None) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims have logical `names`.

  Mesh axes that do not divide a dimension, or that an earlier dimension already uses, are dropped.
  """
  table = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    kept = []
    for axis in axes:
      size = mesh_axis_sizes.get(axis, 1)
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh_axis_sizes[a] for a in kept) * size) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def mesh_sizes(mesh) -> dict[str, int]:
  """Axis name -> size ({} without a mesh)."""
  return {} if mesh is None else dict(zip(mesh.axis_names, map(int, mesh.axis_sizes)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh_sizes(mesh)))


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  axes = variable.get_metadata().get("logical_axes")
  if axes is None:
    return (None,) * len(variable.shape)
  return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules | None = None):
  """A pure-dict tree of NamedShardings, one per Variable of `state`, from its logical axes."""
  sizes = mesh_sizes(mesh)

  def one(v: nnx.Variable):
    return NamedSharding(mesh, logical_spec(variable_logical_axes(v), v.shape, sizes, rules))

  return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def create_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh,
                   rules: LogicalRules | None = None) -> nnx.Module:
  """Builds `constructor()` directly in its sharded layout: abstract init, then a jitted init whose
  outputs land on their shardings (no full unsharded copy on any host)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(constructor))
  shardings = state_shardings(abstract, mesh, rules)

  @jax.jit
  def init():
    return nnx.to_pure_dict(nnx.state(constructor()))

  with jax.set_mesh(mesh):
    values = jax.jit(init, out_shardings=shardings)()
  nnx.replace_by_pure_dict(abstract, values)
  return nnx.merge(graphdef, abstract)


def abstract_state(abstract: nnx.Module, mesh: Mesh, *filters, rules: LogicalRules | None = None):
  """(graphdef, one pure dict per nnx filter) of ShapeDtypeStructs on their logical-axis shardings, from a
  module made by `nnx.eval_shape`: a checkpoint's restore target, with nothing allocated."""
  graphdef, *states = nnx.split(abstract, *filters)

  def with_shardings(state):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                        state_shardings(state, mesh, rules))

  return (graphdef, *map(with_shardings, states))


def shard_model(model: nnx.Module, mesh: Mesh, rules: LogicalRules | None = None) -> nnx.Module:
  """Moves an existing model's parameters onto their shardings (in place) and returns it."""
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules)
  values = jax.device_put(nnx.to_pure_dict(state), shardings)
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  return model


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes)) + \
      f" on {np.asarray(mesh.devices).size} {jax.devices()[0].platform} devices"
