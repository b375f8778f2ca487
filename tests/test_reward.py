"""The multi-view reward against an independent restatement of upstream's compute_score."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import pytrec_eval

from rrjax.ranking import reward as rw

UPSTREAM_PATTERN = r"<think>.*?</think>\s*<answer>(.*?)</answer>"  # listwise_prompt_r1.toml


def _clean(s):
  return " ".join("".join(c if c.isdigit() else " " for c in s).split())


def _rbo_package(S, T):
  """rbo.RankingSimilarity(S, T).rbo() with its default p=1.0, step by step as the package does."""
  assert len(S) == len(set(S)) and len(T) == len(set(T))
  if not S and not T:
    return 1.0
  if not S or not T:
    return 0.0
  k = min(len(S), len(T))
  A = [0.0] * k
  AO = [0.0] * k
  A[0] = AO[0] = 1.0 if S[0] == T[0] else 0.0
  seen_s, seen_t = {S[0]}, {T[0]}
  for d in range(1, k):
    tmp = (S[d] in seen_t) + (T[d] in seen_s) + (S[d] == T[d])
    A[d] = (A[d - 1] * d + tmp) / (d + 1)
    AO[d] = (AO[d - 1] * d + A[d]) / (d + 1)
    seen_s.add(S[d])
    seen_t.add(T[d])
  return AO[-1]


def upstream_reward(predict_str, ground_truth, initial_list, relevant_docids):
  """Upstream's compute_score, with pytrec_eval for ndcg/recall: (reward, ndcg, recall, rbo)."""
  match = re.search(UPSTREAM_PATTERN, predict_str, re.DOTALL)
  if not match:
    return -1.0, 0.0, 0.0, 0.0
  pred = _clean(match.group(1)).split()
  label = _clean(ground_truth).split()
  if not (len(pred) == len(label) and len(set(pred)) == len(set(label))):
    return 0.0, 0.0, 0.0, 0.0
  try:
    idxs = [int(x) - 1 for x in pred]
  except ValueError:
    return 0.0, 0.0, 0.0, 0.0
  docids = [initial_list[i] for i in idxs if i < len(initial_list)]
  run = {"1": {d: -(i + 1) for i, d in enumerate(docids)}}
  qrels = {"1": {d: 1 for d in relevant_docids}}
  res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)["1"]
  ndcg, recall = res["ndcg_cut_10"], res["recall_10"]
  rbo = _rbo_package(pred, label)
  return ndcg + 0.2 * recall + 0.1 * rbo, ndcg, recall, rbo


def _fmt(ids, rnd):
  sep = rnd.choice([" > ", ">", " > ", ", ", " "])
  return sep.join(f"[{i}]" for i in ids)


def _wrap(answer, rnd):
  think = rnd.choice(["reasoning", "", "a > b\n[3] is best", "multi\nline\n<answer>[1]</answer>?"])
  gap = rnd.choice([" ", "", "\n\n", " \t\n"])
  tail = rnd.choice(["", "\n", " trailing [7]"])
  return f"<think>{think}</think>{gap}<answer>{answer}</answer>{tail}"


def make_case(rnd: random.Random, kind: str):
  n = rnd.choice([5, 10, 20])
  initial = [f"doc{rnd.randrange(10**6)}_{i}" for i in range(n)]
  gold_ids = rnd.sample(range(1, n + 1), n)
  gold = _fmt(gold_ids, rnd)
  relevant = rnd.sample(initial, rnd.randint(1, min(6, n))) + [f"absent{j}" for j in range(rnd.randint(0, 2))]
  perm = rnd.sample(range(1, n + 1), n)
  if kind == "valid":
    text = _wrap(_fmt(perm, rnd), rnd)
  elif kind == "gold":
    text = _wrap(gold, rnd)
  elif kind == "missing_tags":
    body = _fmt(perm, rnd)
    text = rnd.choice([f"<think>x</think> {body}", f"<answer>{body}</answer>", f"<think>x <answer>{body}</answer>",
                       f"<think>x</think><answer>{body}", body])
  elif kind == "tag_case":
    body = _fmt(perm, rnd)
    text = rnd.choice([f"<Think>x</Think><answer>{body}</answer>", f"<think>x</think><ANSWER>{body}</ANSWER>",
                       f"<think>x</think> <Answer>{body}</Answer>"])
  elif kind == "duplicate":
    dup = list(perm)
    dup[rnd.randrange(n)] = dup[rnd.randrange(n)]
    text = _wrap(_fmt(dup, rnd), rnd)
  elif kind == "wrong_count":
    ids = perm[:-1] if rnd.random() < 0.5 else perm + [n + 1]
    text = _wrap(_fmt(ids, rnd), rnd)
  elif kind == "extra_digits":
    ids = [str(i) for i in perm]
    j = rnd.randrange(n)
    ids[j] = rnd.choice([f"{ids[j]}a{n + 3}", f"{ids[j]}.5", f"{ids[j]}{ids[j]}", f"x{ids[j]}y"])
    text = _wrap(" > ".join(f"[{x}]" for x in ids), rnd)
  elif kind == "zero":
    ids = [i - 1 for i in perm]  # 0-based: contains "0"
    text = _wrap(_fmt(ids, rnd), rnd)
  elif kind == "above_n":
    ids = list(perm)
    for j in rnd.sample(range(n), rnd.randint(1, n)):
      ids[j] = n + 1 + j
    text = _wrap(_fmt(ids, rnd), rnd)
  elif kind == "leading_zero":
    ids = [str(i) for i in perm]
    j = rnd.randrange(n)
    ids[j] = "0" + str(perm[(j + 1) % n])  # "07" next to "7": distinct strings, same passage
    text = _wrap(" > ".join(f"[{x}]" for x in ids), rnd)
  elif kind == "unicode_digits":
    ids = [str(i) for i in perm]
    j = rnd.randrange(n)
    ids[j] = rnd.choice(["\u00b2", "\u0663", "\u0661\u0660"])  # superscript 2, Arabic-Indic 3 and 10
    text = _wrap(" > ".join(f"[{x}]" for x in ids), rnd)
  else:
    raise ValueError(kind)
  return text, gold, initial, relevant


KINDS = ("valid", "gold", "missing_tags", "tag_case", "duplicate", "wrong_count", "extra_digits",
         "zero", "above_n", "leading_zero", "unicode_digits")


def test_batch_matches_upstream_on_generated_completions():
  rnd = random.Random(1234)
  cases = [make_case(rnd, KINDS[i % len(KINDS)]) for i in range(2200)]
  got = rw.batch_rewards(*map(list, zip(*cases)))
  want = np.array([upstream_reward(*c) for c in cases])
  assert got.reward.shape == (len(cases),)
  np.testing.assert_allclose(got.reward, want[:, 0], atol=2e-6)
  np.testing.assert_allclose(got.ndcg10, want[:, 1], atol=2e-6)
  np.testing.assert_allclose(got.recall10, want[:, 2], atol=2e-6)
  np.testing.assert_allclose(got.rbo, want[:, 3], atol=2e-6)
  np.testing.assert_array_equal(got.format_ok, want[:, 0] != -1)
  # Every kind produced what it was meant to exercise.
  by_kind = {k: want[i::len(KINDS), 0] for i, k in enumerate(KINDS)}
  assert (by_kind["missing_tags"] == -1).all() and (by_kind["tag_case"] == -1).all()
  assert (by_kind["duplicate"] >= 0).all() and (by_kind["wrong_count"] == 0).all()
  assert (by_kind["gold"] > 0).all() and (by_kind["valid"] > 0).any()
  assert (by_kind["unicode_digits"] == 0).any() and (by_kind["unicode_digits"] > 0).any()


INIT = [f"p{i}" for i in range(1, 6)]  # window passages [1]..[5]
GOLD = "[3] > [1] > [2] > [5] > [4]"


def _answer(body):
  return f"<think>because</think>\n<answer>{body}</answer>"


def test_quirk_zero_is_last_passage():
  # "0" -> int("0") - 1 = -1 -> initial_list[-1], the last passage (p5).
  with_zero = rw.reward_score(_answer("[0] > [1] > [2] > [3] > [4]"), GOLD, INIT, ["p5"])
  assert with_zero == pytest.approx(upstream_reward(_answer("[0] > [1] > [2] > [3] > [4]"), GOLD, INIT, ["p5"])[0], abs=1e-6)
  parsed = rw.parse_sample(_answer("[0] > [1] > [2] > [3] > [4]"), GOLD, INIT)
  assert parsed.ranked_docids[0] == "p5" and parsed.answer_ok
  assert rw.batch_rewards([_answer("[0] > [1] > [2] > [3] > [4]")], [GOLD], [INIT], [["p5"]]).ndcg10[0] == pytest.approx(1.0)


def test_quirk_ids_past_window_are_dropped():
  parsed = rw.parse_sample(_answer("[9] > [1] > [7] > [3] > [8]"), GOLD, INIT)
  assert parsed.answer_ok and parsed.ranked_docids == ("p1", "p3")
  out = rw.batch_rewards([_answer("[9] > [1] > [7] > [3] > [8]")], [GOLD], [INIT], [["p3"]])
  assert out.ndcg10[0] == pytest.approx(1 / np.log2(3), abs=1e-6)  # p3 now at rank 2


def test_quirk_leading_zero_counts_as_distinct_and_keeps_last_slot():
  parsed = rw.parse_sample(_answer("[01] > [2] > [1] > [3] > [4]"), GOLD, INIT)
  assert parsed.answer_ok and parsed.ranked_docids == ("p2", "p1", "p3", "p4")


def test_format_and_count_rules():
  assert rw.reward_score("no tags [1] > [2]", GOLD, INIT, ["p1"]) == -1.0
  assert rw.reward_score("<think>x</think><Answer>[1]</Answer>", GOLD, INIT, ["p1"]) == -1.0
  assert rw.reward_score(_answer("[1] > [2]"), GOLD, INIT, ["p1"]) == 0.0
  assert rw.reward_score(_answer("[1] > [1] > [2] > [3] > [4]"), GOLD, INIT, ["p1"]) == 0.0
  assert rw.reward_score(_answer("[\u00b2] > [1] > [3] > [4] > [5]"), GOLD, INIT, ["p1"]) == 0.0
  perfect = rw.reward_score(_answer(GOLD), GOLD, INIT, ["p3", "p1"])
  assert perfect == pytest.approx(1.0 + 0.2 * 1.0 + 0.1 * 1.0, abs=1e-6)


def test_no_relevant_docids_scores_zero_ndcg_recall():
  out = rw.batch_rewards([_answer(GOLD)], [GOLD], [INIT], [[]])
  assert out.ndcg10[0] == 0.0 and out.recall10[0] == 0.0 and out.reward[0] == pytest.approx(0.1)


def test_fixed_shapes_compile_once():
  rnd = random.Random(7)
  rw.batch_rewards(*map(list, zip(*[make_case(rnd, "valid") for _ in range(100)])))
  before = rw.compute_rewards._cache_size()
  for size in (97, 128, 65):
    rw.batch_rewards(*map(list, zip(*[make_case(rnd, KINDS[i % len(KINDS)]) for i in range(size)])))
  assert rw.compute_rewards._cache_size() == before
  assert rw.batch_rewards([], [], [], []).reward.shape == (0,)
