"""The benchmarks' peer: transformers' Qwen2ForCausalLM (torch) holding exactly an rrjax model's weights."""

from __future__ import annotations

import numpy as np

from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2Config


def torch_config(config: Qwen2Config):
  import transformers
  return transformers.Qwen2Config(**{k: v for k, v in config.to_hf_dict().items()
                                     if k not in ("architectures", "torch_dtype")})


def device() -> str:
  """Where the peer runs: the GPU when jax runs on one and torch sees CUDA (same card), else the CPU."""
  import jax
  import torch
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def synced(fn):
  """`fn` followed by a CUDA synchronize when the peer is on the GPU, so that wall time covers the work."""
  import torch
  if device() == "cpu":
    return fn

  def run(*args, **kwargs):
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out
  return run


def torch_twin(config: Qwen2Config, weights: dict[str, np.ndarray], dtype: str = "float32"):
  """A transformers model of `config` whose tensors are `weights` (HF names, e.g. dict(hf.hf_tensors(m))),
  on `device()`."""
  import torch
  import transformers
  ref = transformers.Qwen2ForCausalLM(torch_config(config))
  with torch.no_grad():
    params = dict(ref.named_parameters())
    for name, array in weights.items():
      params[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
  return ref.to(device=device(), dtype=getattr(torch, dtype))


def weights_of(model) -> dict[str, np.ndarray]:
  return dict(hf.hf_tensors(model, dtype="float32"))
