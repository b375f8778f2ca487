"""The benchmarks' peer: transformers' Qwen2ForCausalLM (torch) holding exactly an rrjax model's weights."""

from __future__ import annotations

import numpy as np

from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2Config


def torch_config(config: Qwen2Config):
  import transformers
  return transformers.Qwen2Config(**{k: v for k, v in config.to_hf_dict().items()
                                     if k not in ("architectures", "torch_dtype")})


def torch_twin(config: Qwen2Config, weights: dict[str, np.ndarray], dtype: str = "float32"):
  """A transformers model of `config` whose tensors are `weights` (HF names, e.g. dict(hf.hf_tensors(m)))."""
  import torch
  import transformers
  ref = transformers.Qwen2ForCausalLM(torch_config(config))
  with torch.no_grad():
    params = dict(ref.named_parameters())
    for name, array in weights.items():
      params[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
  return ref.to(getattr(torch, dtype))


def weights_of(model) -> dict[str, np.ndarray]:
  return dict(hf.hf_tensors(model, dtype="float32"))
