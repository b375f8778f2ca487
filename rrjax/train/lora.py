"""LoRA: add adapters to a model without copying or re-initialising its base weights, and merge them back.

The adapters are `nnx.LoRAParam`s inside the decoder layers (see rrjax/model/qwen2.py), so the training
state splits into trainable adapters and frozen base weights, and the GRPO reference policy is the frozen
base itself (adapters off), never a second copy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rrjax.model.qwen2 import LORA_TARGETS, Qwen2, merged_kernel
from rrjax.train.config import LoraConfig

_KERNELS = {"q": "q_kernel", "k": "k_kernel", "v": "v_kernel", "o": "o_kernel", "gate": "gate_kernel",
            "up": "up_kernel", "down": "down_kernel"}


def with_lora_config(config, lora: LoraConfig):
  if not lora.rank:
    return config
  unknown = set(lora.targets) - set(LORA_TARGETS)
  if unknown:
    raise ValueError(f"LoraConfig.targets: {sorted(unknown)} are not among {LORA_TARGETS}")
  return config.replace(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=tuple(lora.targets))


def apply_lora(model: Qwen2, lora: LoraConfig, *, seed: int = 0) -> Qwen2:
  """`model` with fresh adapters (A uniform, B zero, so the output is unchanged) sharing its base arrays."""
  config = with_lora_config(model.config, lora)
  if config == model.config:
    return model
  graphdef, adapters = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(seed))), nnx.LoRAParam, ...)[:2]
  key = jax.random.key(seed)
  values = {}
  for i, (path, v) in enumerate(sorted(nnx.to_flat_state(adapters))):
    name = path[-1]
    if name.endswith("_lora_a"):
      bound = 1.0 / math.sqrt(math.prod(v.shape[1:-1]))  # PEFT's kaiming-uniform(a=sqrt(5)) bound
      value = jax.random.uniform(jax.random.fold_in(key, i), v.shape, v.dtype, -bound, bound)
    else:
      value = jnp.zeros(v.shape, v.dtype)
    values.setdefault("layers", {})[name] = value
  return nnx.merge(graphdef, values, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def merge_lora(model: Qwen2) -> Qwen2:
  """A plain model whose kernels are W + (alpha / r) A B; the adapters are gone."""
  c = model.config
  if not c.lora_rank:
    return model
  plain = c.replace(lora_rank=0, lora_targets=())
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2(plain, rngs=nnx.Rngs(0))))
  values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layers = values["layers"]
  for target in c.lora_targets:
    kernel = _KERNELS[target]
    a, b = layers.pop(f"{target}_lora_a"), layers.pop(f"{target}_lora_b")
    layers[kernel] = jax.jit(merged_kernel, static_argnums=(3, 4))(layers[kernel], a, b, c.lora_alpha, c.lora_rank)
  return nnx.merge(graphdef, values)
