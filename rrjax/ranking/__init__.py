"""ReasonRank's ranking semantics (prompts, parser, windows, Rank1) and the JAX metrics and reward.

Prompt/parse/window code is pure Python; metrics and reward import jax lazily on first use.
"""

import importlib

from rrjax.ranking.parse import (ANSWER_PATTERN, ANSWER_RE, SOURCES, answer_ids, answer_span, clean_response,
                                 parse_permutation, parse_permutation_with_source)
from rrjax.ranking.pointwise import (POINTWISE_SOURCES, rank1_label_ids, rank1_passage, rank1_prompt,
                                     rank1_reasoning)
from rrjax.ranking.prompt import (CONTENT_FIELDS, PROMPT_MODES, SYSTEM_PROMPT, SYSTEM_PROMPT_REASONING,
                                  UPSTREAM_MODES, build_messages, build_prompt, passage_content, post_prompt,
                                  prefix_prompt, prompt_mode, replace_number, system_prompt, titled_content,
                                  user_message)
from rrjax.ranking.rerank_loop import rerank_listwise, rerank_pointwise
from rrjax.ranking.window import apply_permutation, full_list_window, sliding_windows

_LAZY = {"reward_score": "rrjax.ranking.reward", "batch_rewards": "rrjax.ranking.reward",
         "metrics": "rrjax.ranking.metrics", "reward": "rrjax.ranking.reward"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith(name) else getattr(module, name)
  raise AttributeError(f"module 'rrjax.ranking' has no attribute {name!r}")
