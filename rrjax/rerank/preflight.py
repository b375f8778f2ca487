"""Reranking memory before renting (`python -m rrjax.preflight --model ARCH --gin_file configs/rerank/...`): the
engine programs a rerank with these settings runs, built from abstract shapes only (no weights, no data).

Listwise and full-list reranking keep one engine whose slots hold the longest window prompt (with the
backend's headroom) plus `max_new_tokens`; its slots, prefill group and prefill chunk are planned for the
device budget exactly as rrjax.rerank.backend plans them at run time (or `batch_size` slots when the
settings name them), for as many concurrent windows as there are queries. Rank1 (pointwise) runs generate
over chunks of its (query, passage) prompts, then a scoring pass over prompt + reasoning that keeps the last
logits. The longest window is computed, not read: `window` passages (top_k for a full list) of
`max_passage_tokens` tokens each and a query of `query_tokens` tokens (it appears twice in the prompt).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from rrjax import aot, decode
from rrjax.engine import core as engine_lib
from rrjax.engine.config import EngineConfig
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import Qwen2, Qwen2Config
from rrjax.ranking.pointwise import rank1_passage, rank1_prompt
from rrjax.ranking.prompt import build_prompt
from rrjax.rerank import backend
from rrjax.rerank.settings import RerankSettings

# BRIGHT's queries run 93-594 tokens on average per task (Qwen2.5 tokenizer), the longest 7,182 (robotics).
QUERY_TOKENS = 512
POINTWISE_CHUNK = 256  # Rank1 prompts per generate call (rrjax.rerank.runner's chunk without a batch size)


def architecture(name: str) -> tuple[Qwen2Config, str]:
  """(config, where it came from) for a preset name (`qwen2_5_7b`, `Qwen2.5-7B`, `tiny`), an HF config.json (or its
  directory) or an rrjax run directory; ValueError naming the argument otherwise."""
  from rrjax.checkpoints import load_config

  path = Path(name)
  if path.name == "config.json" and path.is_file():
    path = path.parent
  if path.exists():
    return load_config(path), f"architecture of {path}"
  try:
    return Qwen2Config.preset(name), f"preset {name}"
  except ValueError:
    raise ValueError(f"--model {name}: neither a file or directory here nor a preset (qwen2_5_7b, Qwen2.5-32B, "
                     "tiny, ...)") from None


def _filler(tokens: int) -> str:
  return " the" * tokens  # one token per word in Qwen2.5's vocabulary; the tokenizer cuts passages anyway


def longest_prompt(settings: RerankSettings, tokenizer, query_tokens: int = QUERY_TOKENS) -> int:
  """Tokens of the longest prompt these settings build (see the module docstring)."""
  query = _filler(query_tokens)
  passage = _filler(settings.max_passage_tokens + 8)
  if settings.mode == "pointwise":
    text = rank1_prompt(query, rank1_passage(passage, tokenizer, settings.max_passage_tokens))
  else:
    n = settings.top_k if settings.mode == "full" else min(settings.window, settings.top_k)
    text = build_prompt(query, [passage] * n, tokenizer, max_passage_tokens=settings.max_passage_tokens,
                        mode=settings.prompt_mode)
  return len(tokenizer.encode(text))


def abstract_model(config: Qwen2Config) -> Qwen2:
  return nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))


def programs(model, settings: RerankSettings, tokenizer, mesh, *, hbm_bytes: int, num_queries: int = 100,
             query_tokens: int = QUERY_TOKENS) -> tuple[list[aot.Program], dict]:
  """(programs, engine shape) of a rerank of `num_queries` queries with `settings` on `mesh`, the engine
  planned for `hbm_bytes` per device; `model` may be abstract (`abstract_model`)."""
  s = settings
  prompt = longest_prompt(s, tokenizer, query_tokens)
  if s.mode == "pointwise":
    rows = min(num_queries * s.top_k, max(s.batch_size or 0, POINTWISE_CHUNK))
    want = EngineConfig(slots=s.batch_size or 0, sampling=backend.sampling(s))
    common = dict(mesh=mesh, memory_limit_bytes=hbm_bytes, prefix="")
    built = decode.programs(model, rows, prompt, max_new_tokens=s.max_new_tokens, engine=want,
                            stop_ids=tokenizer.stop_ids, **common)
    # The scoring pass: prompt + reasoning + `</think>`, one greedy step, its logits kept.
    built += [(f"score_{name}", fn, args) for name, fn, args in decode.programs(
        model, rows, prompt + s.max_new_tokens + 8, max_new_tokens=1,
        engine=dataclasses.replace(backend.SCORING, slots=want.slots), **common)]
    shape = {"prompt_tokens": prompt, "prompts_per_call": rows, **_shapes(built, ""), **_shapes(built, "score_")}
  else:
    config, P = backend.listwise_engine(model, s, prompt_tokens=prompt, max_new_tokens=s.max_new_tokens,
                                        num_slots=num_queries, mesh=mesh, memory_limit_bytes=hbm_bytes,
                                        what=f"the longest window ({prompt} prompt tokens, {s.max_new_tokens} new)")
    built = engine_lib.abstract_programs(model, config, prompt_len=P, mesh=mesh)  # the longest prefill
    shape = {"prompt_tokens": prompt, **_shapes(built, ""), "prefill_chunk": config.prefill_chunk,
             "estimate_bytes": config.estimate.total}
  c = model.config

  def kernel(name, args):  # the prompt attends to itself in prefill; decode reads the slot cache
    return attention_lib.kernel_for(c.attention, args[1].shape[1], c.dtype, c.head_dim) if name.endswith(
        "prefill") else None

  return [aot.Program(name, fn, args, 0, kernel(name, args)) for name, fn, args in built], shape


def _shapes(built, prefix: str) -> dict:
  """Slots, slot length, prefill group and prompt positions of one engine's programs, read off their arguments."""
  args = {name: a for name, _, a in built}
  _, tokens_GxP, _, _, cache = args[prefix + "prefill"]
  state = args[prefix + "decode"][2]
  return {f"{prefix}slots": int(state.lengths_B.shape[0]), f"{prefix}slot_length": int(cache.k.shape[2]),
          f"{prefix}prefill_group": int(tokens_GxP.shape[0]), f"{prefix}prefill_prompt": int(tokens_GxP.shape[1])}
