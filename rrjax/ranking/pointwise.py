"""Rank1 (Weller et al., 2025), the pointwise peer: its passage, prompt, reasoning cut and true/false label tokens.

The score is p(true) / (p(true) + p(false)) at the token after `</think>`; the model side lives elsewhere.
"""

from __future__ import annotations

import re

from rrjax.ranking.prompt import Passage, passage_content

THINK_END = "</think>"
# Rank1 sources: the model closed its reasoning; it was cut at its last sentence end; scoring failed (0.5).
POINTWISE_SOURCES = ("think_end", "cut", "failed")
_SENTENCE_END = re.compile(r"[.!?。](?=\s|$)")


def rank1_passage(passage: Passage, tokenizer, max_tokens: int | None = 512) -> str:
  """The listwise passage rule without `[n] -> (n)`: a pointwise prompt has no identifiers."""
  return passage_content(passage, tokenizer, max_tokens, replace_numbers=False)


def rank1_prompt(query: str, passage: str) -> str:
  """Rank1's raw prompt (no chat template); generation continues the `<think>` block."""
  return ("Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
          f"Query: {query}\n"
          f"Passage: {passage}\n"
          "<think>")


def rank1_reasoning(generated: str) -> tuple[str, str]:
  """(reasoning text ending in `</think>`, source): what the true/false token is scored after.

  A finished chain is kept up to its first `</think>`; an unfinished one is cut back to its last sentence
  end (nothing if it has none) and `\\n</think>` is appended.
  """
  at = generated.find(THINK_END)
  if at >= 0:
    return generated[:at + len(THINK_END)], "think_end"
  ends = list(_SENTENCE_END.finditer(generated))
  kept = generated[:ends[-1].end()] if ends else ""
  return kept + "\n" + THINK_END, "cut"


def rank1_label_ids(tokenizer) -> tuple[int, int]:
  """Token ids of " true" and " false" (each must be a single token)."""
  ids = []
  for word in (" true", " false"):
    encoded = tokenizer.encode(word)
    if len(encoded) != 1:
      raise ValueError(f"{word!r} is not a single token for this tokenizer: {encoded}")
    ids.append(encoded[0])
  return ids[0], ids[1]
