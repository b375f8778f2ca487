"""rrjax: ReasonRank in JAX.

Heavy submodules load lazily so that `import rrjax.tokenizer` or `rrjax.ranking` stays cheap.
"""

import importlib
import importlib.util
import os

_LAZY = {
    "Qwen2Config": "rrjax.model.qwen2",
    "Qwen2": "rrjax.model.qwen2",
    "from_pretrained": "rrjax.checkpoints",
    "save_pretrained": "rrjax.model.hf",
    "generate": "rrjax.decode",
    "Generation": "rrjax.decode",
    "EngineConfig": "rrjax.engine.config",
    "Reranker": "rrjax.serve.reranker",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'rrjax' has no attribute {name!r}")


def _quiet_absent_tpu() -> None:
  """With libtpu installed (rrjax[tpu], for preflight's TPU compiles) JAX would load it on the first device call
  and libtpu prints warnings on a machine without TPU chips; the entry points avoid that (rrjax.cli), and so must
  `import rrjax` in a user's script. TPU topologies still compile (rrjax.hardware.skip_absent_tpu). Without
  libtpu, or with JAX_PLATFORMS set, nothing is imported here: `import rrjax.tokenizer` stays cheap."""
  if "JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None:
    from rrjax import hardware
    hardware.skip_absent_tpu()


_quiet_absent_tpu()
