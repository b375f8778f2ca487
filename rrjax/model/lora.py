"""Low-rank adapters (LoRA) on the decoder's projections: the one config, the target table, the adapter
initialisation, the forward delta and the merge.

Adapters are `nnx.LoRAParam`s inside the stacked decoder layers, so a model's state splits into
trainable adapters and frozen base weights (`trainable_filter`), and the GRPO reference policy is the
frozen base itself (adapters off), never a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class Target(NamedTuple):
  kernel: str  # the stacked base kernel [L, in..., out...]
  in_axes: tuple[str, ...]  # logical axes of its input dims
  out_axes: tuple[str, ...]  # logical axes of its output dims
  in_letters: str  # einsum letters of the input dims
  out_letters: str  # einsum letters of the output dims


TARGETS = {
    "q": Target("q_kernel", ("embed",), ("q_heads", "head_dim"), "d", "nh"),
    "k": Target("k_kernel", ("embed",), ("kv_heads", "head_dim"), "d", "nh"),
    "v": Target("v_kernel", ("embed",), ("kv_heads", "head_dim"), "d", "nh"),
    "o": Target("o_kernel", ("q_heads", "head_dim"), ("embed",), "nh", "e"),
    "gate": Target("gate_kernel", ("embed",), ("mlp",), "d", "f"),
    "up": Target("up_kernel", ("embed",), ("mlp",), "d", "f"),
    "down": Target("down_kernel", ("mlp",), ("embed",), "f", "e"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapters of `rank` on the named projections (q k v o gate up down); rank 0 means none."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = tuple(TARGETS)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f"LoraConfig.targets: {sorted(unknown)} are not among {tuple(TARGETS)}")
    if self.rank < 0:
      raise ValueError(f"LoraConfig.rank: {self.rank} must be >= 0")

  @property
  def active(self) -> tuple[str, ...]:
    """The targets that carry adapters (none at rank 0)."""
    return self.targets if self.rank else ()

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def init_adapter(key, kernel_shape, target: str, rank: int, dtype):
  """(A, B) for one stacked kernel: A uniform within PEFT's kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in),
  B zero, so the adapted model starts as the base model."""
  n_in = len(TARGETS[target].in_axes)
  in_dims, out_dims = kernel_shape[1:1 + n_in], kernel_shape[1 + n_in:]
  bound = 1.0 / math.sqrt(math.prod(in_dims))
  a = jax.random.uniform(key, (kernel_shape[0], *in_dims, rank), dtype, -bound, bound)
  return a, jnp.zeros((kernel_shape[0], rank, *out_dims), dtype)


def add_adapters(layers: nnx.Module, lora: LoraConfig, rngs: nnx.Rngs) -> None:
  """Creates `<target>_lora_a` / `<target>_lora_b` LoRAParams on a DecoderLayers module."""
  for target in lora.active:
    t = TARGETS[target]
    kernel = getattr(layers, t.kernel)
    a, b = init_adapter(rngs.params(), kernel.shape, target, lora.rank, kernel.dtype)
    setattr(layers, f"{target}_lora_a", nnx.LoRAParam(a, logical_axes=("layers", *t.in_axes, "lora")))
    setattr(layers, f"{target}_lora_b", nnx.LoRAParam(b, logical_axes=("layers", "lora", *t.out_axes)))


def delta(x, target: str, w, lora: LoraConfig, dtype):
  """(alpha / r) * x A B for one projection of one layer, or None when `target` has no adapter."""
  a = w.get(f"{target}_lora_a")
  if a is None:
    return None
  t = TARGETS[target]
  i, o = t.in_letters, t.out_letters
  low = jnp.einsum(f"bt{i},{i}r->btr", x, a.astype(dtype))
  return lora.scale * jnp.einsum(f"btr,r{o}->bt{o}", low, w[f"{target}_lora_b"].astype(dtype))


def merged_kernel(kernel, a, b, scale: float):
  """kernel + scale * A B for stacked kernels [L, in..., out...], A [L, in..., r], B [L, r, out...]."""
  low = a.reshape(a.shape[0], -1, a.shape[-1])
  high = b.reshape(b.shape[0], b.shape[1], -1)
  d = jnp.einsum("lir,lro->lio", low.astype(jnp.float32), high.astype(jnp.float32)).reshape(kernel.shape)
  return (kernel.astype(jnp.float32) + scale * d).astype(kernel.dtype)


def trainable(config) -> type[nnx.Variable]:
  """What trains in a model of `config`: its adapters when it has any, else every parameter."""
  return nnx.LoRAParam if config.lora.active else nnx.Param


def apply_lora(model: nnx.Module, lora: LoraConfig, *, seed: int = 0) -> nnx.Module:
  """`model` with fresh adapters (its output unchanged) sharing its base arrays; `model` when rank is 0."""
  config = model.config.replace(lora=lora)
  if not lora.rank or config == model.config:
    return model
  abstract = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(seed)))
  graphdef, adapters, _ = nnx.split(abstract, nnx.LoRAParam, ...)
  key = jax.random.key(seed)
  values = {}
  for i, (path, v) in enumerate(sorted(nnx.to_flat_state(adapters))):
    name = path[-1]
    if name.endswith("_lora_a"):
      kernel_shape = getattr(model.layers, TARGETS[name.removesuffix("_lora_a")].kernel).shape
      value, _ = init_adapter(jax.random.fold_in(key, i), kernel_shape, name.removesuffix("_lora_a"), lora.rank,
                              v.dtype)
    else:
      value = jnp.zeros(v.shape, v.dtype)
    values.setdefault("layers", {})[name] = value
  return nnx.merge(graphdef, values, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A plain model whose kernels are W + (alpha / r) A B; the adapters are gone."""
  lora = model.config.lora
  if not lora.rank:
    return model
  plain = model.config.replace(lora=LoraConfig())
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(plain, rngs=nnx.Rngs(0))))
  values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layers = values["layers"]
  merge = jax.jit(merged_kernel, static_argnums=(3,))
  for target in lora.active:
    kernel = TARGETS[target].kernel
    a, b = layers.pop(f"{target}_lora_a"), layers.pop(f"{target}_lora_b")
    layers[kernel] = merge(layers[kernel], a, b, lora.scale)
  return nnx.merge(graphdef, values)
