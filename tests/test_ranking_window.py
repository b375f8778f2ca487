"""Sliding windows against a transcription of upstream's loop, and applying window permutations."""

import dataclasses
from typing import NamedTuple

import pytest

from rrjax.ranking.window import apply_permutation, full_list_window, sliding_windows


def upstream_windows(num_candidates, window_size, step, rank_start=0, rank_end=100):
  """rerank/reranker.py's clamping, then rerank/rankllm.py `sliding_windows`, with a loop guard."""
  rank_start = max(rank_start, 0)
  rank_end = min(rank_end, num_candidates)
  window_size = min(window_size, num_candidates)
  windows = []
  windows_end = rank_end
  windows_start = rank_end - window_size
  while windows_end > rank_start and windows_start + step != rank_start:
    windows_start = max(windows_start, rank_start)
    windows.append((windows_start, windows_end))
    windows_end = windows_end - step
    windows_start = windows_start - step
    assert len(windows) < 10_000, "upstream loop did not end"
  return windows


LITERAL = {
    (100, 20, 10): [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50), (20, 40), (10, 30), (0, 20)],
    (95, 20, 10): [(75, 95), (65, 85), (55, 75), (45, 65), (35, 55), (25, 45), (15, 35), (5, 25), (0, 15)],
    (20, 20, 10): [(0, 20)],
    (7, 20, 10): [(0, 7)],
    (10, 20, 10): [(0, 10)],
    (100, 10, 5): [(s, s + 10) for s in range(90, -1, -5)],
    (100, 20, 20): [(80, 100), (60, 80), (40, 60), (20, 40), (0, 20)],
    (100, 10, 20): [(90, 100), (70, 80), (50, 60), (30, 40), (10, 20)],   # stride > window leaves gaps
    (0, 20, 10): [],
}


@pytest.mark.parametrize("args", sorted(LITERAL))
def test_literal_windows(args):
  assert sliding_windows(*args) == LITERAL[args]
  assert upstream_windows(*args, rank_end=args[0]) == LITERAL[args]


def test_matches_upstream_loop_on_a_grid():
  for n in range(0, 61):
    for window in range(1, 25):
      for stride in range(1, 25):
        assert sliding_windows(n, window, stride) == upstream_windows(n, window, stride, rank_end=n), (n, window, stride)


def test_rank_end_defaults_like_upstream_top_100():
  assert sliding_windows(150, rank_end=100) == upstream_windows(150, 20, 10)
  assert sliding_windows(150, rank_end=100)[0] == (80, 100)
  assert sliding_windows(50, 20, 10, rank_start=10) == upstream_windows(50, 20, 10, rank_start=10)


@pytest.mark.parametrize("window,stride", [(0, 10), (-1, 10), (20, 0), (20, -5)])
def test_invalid_arguments(window, stride):
  with pytest.raises(ValueError):
    sliding_windows(100, window, stride)


def test_negative_candidates():
  with pytest.raises(ValueError):
    sliding_windows(-1)


def test_full_list():
  assert full_list_window(37) == [(0, 37)]
  assert full_list_window(0) == []


def run(n):
  return [{"docid": f"d{i}", "score": float(n - i)} for i in range(n)]


def test_identity_model_leaves_run_unchanged():
  cands = run(100)
  out = cands
  for start, end in sliding_windows(100):
    out = apply_permutation(out, start, end, list(range(end - start)))
  assert out == cands


def test_reversing_model_100():
  out = run(100)
  for start, end in sliding_windows(100):
    out = apply_permutation(out, start, end, list(range(end - start))[::-1])
  # Worked by hand: the top block d90..d99 is carried to the front reversed; every other block of ten
  # ends up one block lower, reversed; the first window's lower half (d80..d89) ends in slots 90..99.
  expected = [f"d{i}" for i in range(99, 89, -1)]
  for b in range(9):
    expected += [f"d{i}" for i in range(10 * b + 9, 10 * b - 1, -1)]
  assert [c["docid"] for c in out] == expected
  assert [c["score"] for c in out] == [float(100 - i) for i in range(100)]


def test_reversing_model_small_literal():
  out = [{"docid": d, "score": s} for d, s in zip("abcde", (5, 4, 3, 2, 1))]
  assert sliding_windows(5, 3, 2) == [(2, 5), (0, 3)]
  out = apply_permutation(out, 2, 5, [2, 1, 0])
  assert [c["docid"] for c in out] == list("abedc")
  out = apply_permutation(out, 0, 3, [2, 1, 0])
  assert [(c["docid"], c["score"]) for c in out] == [("e", 5), ("b", 4), ("a", 3), ("d", 2), ("c", 1)]


def test_documents_move_scores_stay_and_input_untouched():
  cands = [{"docid": "a", "score": 3.0, "extra": 1}, {"docid": "b", "score": 2.0}, {"docid": "c", "score": 1.0}]
  before = [dict(c) for c in cands]
  out = apply_permutation(cands, 0, 3, [2, 0, 1])
  assert out == [{"docid": "c", "score": 3.0}, {"docid": "a", "score": 2.0, "extra": 1}, {"docid": "b", "score": 1.0}]
  assert cands == before


@dataclasses.dataclass(frozen=True)
class Cand:
  docid: str
  score: float


class CandTuple(NamedTuple):
  docid: str
  score: float


@pytest.mark.parametrize("cls", [Cand, CandTuple])
def test_record_types(cls):
  cands = [cls("a", 2.0), cls("b", 1.0)]
  assert apply_permutation(cands, 0, 2, [1, 0]) == [cls("b", 2.0), cls("a", 1.0)]


def test_bad_permutation():
  with pytest.raises(ValueError):
    apply_permutation(run(3), 0, 3, [0, 0, 1])
  with pytest.raises(ValueError):
    apply_permutation(run(3), 0, 3, [0, 1])
  with pytest.raises(ValueError):
    apply_permutation(run(3), 2, 1, [])
