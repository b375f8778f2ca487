"""Settings of a rerank: the mode, the windows, the passage cut and the decoding; defaults are upstream's."""

from __future__ import annotations

import dataclasses

from rrjax.ranking import prompt as prompt_lib
from rrjax.ranking.rerank_loop import RERANK_MODES, SCHEDULES
from rrjax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class RerankSettings:
  """Reranking settings; the defaults are upstream's (run_rank_llm.sh, rank_listwise_os_llm.py)."""

  mode: str = "listwise"  # listwise | full | pointwise
  # async: each query's next window is queued as soon as its last one is answered; lockstep: upstream's
  # rounds (every query's k-th window together). Under greedy decoding both give the same run.
  schedule: str = "async"
  top_k: int = 100  # candidates reranked per query (upstream retrieval_num); the rest are dropped
  window: int = 20
  stride: int = 10
  max_passage_tokens: int = 512  # 512 on BRIGHT, 100 on BEIR/DL (upstream DOC_MAXLEN)
  max_new_tokens: int = 3172  # reasoning_maxlen 3072 + 100
  min_new_tokens: int = 0
  batch_size: int | None = None  # decode slots; None: as many as the memory budget holds
  temperature: float = 0.0
  top_p: float = 1.0
  # Decoding's top-k and min-p (0: off), as vLLM applies them (rrjax.sampling); `top_k` above is the candidates.
  sampling_top_k: int = 0
  min_p: float = 0.0
  seed: int = 0
  # reasoning (rank_GPT_reasoning: 7B, 32B) | plain (rank_GPT) | qwen3 (rank_GPT_qwen3: 8B); upstream's names work too
  prompt_mode: str = "reasoning"
  max_queries: int | None = None  # only the run's first N queries
  tag: str = "rrjax"
  # (data, fsdp, tensor) over this process's devices; None: one replica per device when the model fits one
  # device, else tensor parallelism over the fewest devices that hold it (rrjax.engine.memory.inference_mesh).
  mesh: MeshConfig | None = None

  def __post_init__(self):
    if self.mode not in RERANK_MODES:
      raise ValueError(f"mode must be one of {RERANK_MODES}, got {self.mode!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    try:
      object.__setattr__(self, "prompt_mode", prompt_lib.prompt_mode(self.prompt_mode))
    except ValueError as e:
      raise ValueError(f"prompt_mode: {e}") from None
    for name in ("top_k", "window", "stride", "max_new_tokens"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    for name in ("batch_size", "max_queries"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if self.max_passage_tokens < 0 or self.min_new_tokens < 0:
      raise ValueError("max_passage_tokens and min_new_tokens must be >= 0")
    if self.min_new_tokens > self.max_new_tokens:
      raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
    if not isinstance(self.sampling_top_k, int) or self.sampling_top_k < 0 or not 0 <= self.min_p <= 1:
      raise ValueError(f"need sampling_top_k >= 0 and 0 <= min_p <= 1, got {self.sampling_top_k!r}, {self.min_p!r}")
    if self.mesh is not None and not isinstance(self.mesh, MeshConfig):
      raise ValueError(f"mesh must be a MeshConfig (gin: @MeshConfig()) or None, got {self.mesh!r}")
    if not self.tag or any(c.isspace() for c in self.tag):
      raise ValueError(f"tag must be non-empty without whitespace: {self.tag!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(RerankSettings))
