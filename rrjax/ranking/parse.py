"""Model output -> window permutation, as upstream rankllm.py `_clean_response` + `receive_permutation`.

Sources, in the order upstream tries them:
  "answer_tag":  `<think>.*?</think>\\s*<answer>(.*?)</answer>` matched on the lowercased text;
  "last_answer": else the text after the last (case-sensitive) `<answer>`;
  "whole_text":  else the whole text.
  "unparsable":  a digit run that `int()` rejects (e.g. '²', which `str.isdigit()` keeps, or more than
                 4300 digits). Upstream catches the ValueError and leaves the window as it was, so the
                 permutation is the identity.
"""

from __future__ import annotations

import re

# listwise_prompt_r1.toml `pattern`, used with re.DOTALL (also the reward's format check).
ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>(.*?)</answer>"
ANSWER_RE = re.compile(ANSWER_PATTERN, re.DOTALL)
SOURCES = ("answer_tag", "last_answer", "whole_text", "unparsable")
_ASCII_ID = re.compile(r"[0-9]+")


def answer_span(text: str) -> tuple[str, str]:
  """(the text upstream reads identifiers from, its source)."""
  match = ANSWER_RE.search(text.lower())
  if match:
    return match.group(1).strip(), "answer_tag"
  if "<answer>" in text:
    return text.split("<answer>")[-1], "last_answer"
  return text, "whole_text"


def clean_response(span: str) -> str:
  """Upstream: every non-digit (by `str.isdigit`) becomes a space, then strip."""
  return "".join(c if c.isdigit() else " " for c in span).strip()


def answer_ids(span: str) -> list[str]:
  """`clean_response(span).split()`: maximal runs of digits. ASCII text takes a regex fast path
  (isdigit() is exactly [0-9] there); anything else goes through the exact Unicode rule."""
  if span.isascii():
    return _ASCII_ID.findall(span)
  return clean_response(span).split()


def parse_permutation_with_source(text: str, n: int) -> tuple[list[int], str]:
  """A 0-based permutation of range(n) and the source it came from (see SOURCES). Never raises on text."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  span, source = answer_span(text)
  try:
    ids = [int(x) - 1 for x in answer_ids(span)]
  except ValueError:
    return list(range(n)), "unparsable"
  seen: set[int] = set()
  perm = []
  for i in ids:  # first occurrence wins; 0 (-> -1) and ids past n are dropped
    if 0 <= i < n and i not in seen:
      seen.add(i)
      perm.append(i)
  perm.extend(i for i in range(n) if i not in seen)
  return perm, source


def parse_permutation(text: str, n: int) -> list[int]:
  """A 0-based permutation of range(n), as upstream reads a window's output."""
  return parse_permutation_with_source(text, n)[0]
