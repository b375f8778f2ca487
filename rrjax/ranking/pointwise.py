"""Rank1 (Weller et al., 2025), the pointwise peer: its prompt and its true/false label tokens.

The score is p(true) / (p(true) + p(false)) at the token after `</think>`; the model side lives elsewhere.
"""

from __future__ import annotations


def rank1_prompt(query: str, passage: str) -> str:
  """Rank1's raw prompt (no chat template); generation continues the `<think>` block."""
  return ("Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
          f"Query: {query}\n"
          f"Passage: {passage}\n"
          "<think>")


def rank1_label_ids(tokenizer) -> tuple[int, int]:
  """Token ids of " true" and " false" (each must be a single token)."""
  ids = []
  for word in (" true", " false"):
    encoded = tokenizer.encode(word)
    if len(encoded) != 1:
      raise ValueError(f"{word!r} is not a single token for this tokenizer: {encoded}")
    ids.append(encoded[0])
  return ids[0], ids[1]
