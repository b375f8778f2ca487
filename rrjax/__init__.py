"""rrjax: ReasonRank in JAX.

Heavy submodules load lazily so that `import rrjax.tokenizer` or `rrjax.ranking` stays cheap.
"""

import importlib

_LAZY = {
    "Qwen2Config": "rrjax.model.qwen2",
    "Qwen2": "rrjax.model.qwen2",
    "from_pretrained": "rrjax.checkpoints",
    "save_pretrained": "rrjax.model.hf",
    "generate": "rrjax.decode",
    "Generation": "rrjax.decode",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'rrjax' has no attribute {name!r}")
