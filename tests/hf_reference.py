"""Random transformers Qwen2ForCausalLM / Qwen3ForCausalLM (torch, float32) models and their rrjax twins, for
parity tests."""

import numpy as np
import torch
import transformers

from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2Config


def torch_model(config: Qwen2Config, seed: int = 0) -> transformers.PreTrainedModel:
  """A random HF model of the config's model_type; biases and norm weights (Qwen3's q/k norms too) are
  randomised so that every tensor matters."""
  torch.manual_seed(seed)
  config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[config.model_type]
  hf_config = config_cls(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
  hf_config._attn_implementation = "eager"
  return randomize(model_cls(hf_config).float().eval())


def randomize(model: transformers.Qwen2ForCausalLM) -> transformers.Qwen2ForCausalLM:
  """Biases and norm weights drawn at random (they start at 0 and 1), in place."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.5)
      elif "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


def varied_model(config: Qwen2Config, seed: int = 0) -> transformers.Qwen2ForCausalLM:
  """torch_model with unit-variance matrices: HF's 0.02-std init makes every step emit the same token."""
  ref = torch_model(config, seed)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim == 2:
        p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
  return ref


def rrjax_twin(model: transformers.Qwen2ForCausalLM, config: Qwen2Config, mesh=None):
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

  def get(name, shape):
    array = state[name]
    assert array.shape == tuple(shape), (name, array.shape, shape)
    return array

  return hf.from_tensors(config, get, mesh=mesh)


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
  if position_ids is not None:
    kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()
