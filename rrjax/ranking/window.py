"""Sliding windows and window permutations, as upstream rankllm.py / reranker.py apply them."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence


def sliding_windows(num_candidates: int, window: int = 20, stride: int = 10, *, rank_start: int = 0,
                    rank_end: int | None = None) -> list[tuple[int, int]]:
  """[start, end) windows, back to front: upstream `sliding_windows` after reranker.py's clamping.

  Reranker.rerank_batch clamps rank_end to the candidate count and the window to the candidate count
  (not to rank_end - rank_start); the loop then stops once a window has started at rank_start.
  100/20/10 gives [(80, 100), (70, 90), ..., (0, 20)].
  """
  if window <= 0 or stride <= 0:  # upstream never ends for stride <= 0
    raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
  if num_candidates < 0:
    raise ValueError(f"num_candidates must be >= 0, got {num_candidates}")
  rank_start = max(rank_start, 0)
  rank_end = num_candidates if rank_end is None else min(rank_end, num_candidates)
  window = min(window, num_candidates)
  windows = []
  end, start = rank_end, rank_end - window
  while end > rank_start and start + stride != rank_start:
    start = max(start, rank_start)
    windows.append((start, end))
    end -= stride
    start -= stride
  return windows


def full_list_window(num_candidates: int) -> list[tuple[int, int]]:
  """Full-list mode: one window over every candidate."""
  return [(0, num_candidates)] if num_candidates > 0 else []


def _score(record: Any) -> Any:
  return record["score"] if isinstance(record, dict) else record.score


def _with_score(record: Any, score: Any) -> Any:
  if isinstance(record, dict):
    return {**record, "score": score}
  if dataclasses.is_dataclass(record):
    return dataclasses.replace(record, score=score)
  if hasattr(record, "_replace"):  # NamedTuple
    return record._replace(score=score)
  record = copy.copy(record)
  record.score = score
  return record


def apply_permutation(candidates: Sequence[Any], start: int, end: int, perm: Sequence[int]) -> list[Any]:
  """A new list with candidates[start:end] reordered by `perm`; the slots keep their scores.

  Upstream receive_permutation: slot start+j gets the document at window position perm[j], with the
  score that slot had. Records are dicts, dataclasses, NamedTuples or objects with a `score` field.
  """
  if not 0 <= start <= end:
    raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
  window = list(candidates[start:end])
  if sorted(perm) != list(range(len(window))):
    raise ValueError(f"perm must be a permutation of range({len(window)}), got {list(perm)}")
  out = list(candidates)
  for j, x in enumerate(perm):
    out[start + j] = _with_score(window[x], _score(window[j]))
  return out
