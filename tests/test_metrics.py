"""rrjax.ranking.metrics: pytrec_eval agreement on random data, properties, rbo formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytrec_eval
from hypothesis import given, settings, strategies as st

from rrjax.ranking import metrics as M

L, R = 16, 16  # fixed padded widths so every hypothesis example reuses one compilation
SETTINGS = settings(max_examples=60, deadline=None)

ndcg10 = jax.jit(functools.partial(M.ndcg_at_k, k=10))
ndcg_full = jax.jit(functools.partial(M.ndcg_at_k, k=None))
recall5 = jax.jit(functools.partial(M.recall_at_k, k=5))
rbo1 = jax.jit(functools.partial(M.rbo, p=1.0))
rbo9 = jax.jit(functools.partial(M.rbo, p=0.9))


def _pad(rows, width, fill=0):
  out = np.full((len(rows), width), fill, np.float32 if fill == 0 else np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


@st.composite
def judged_and_ranking(draw):
  """A query's graded judgments and a ranking drawn from judged and unjudged documents."""
  grades = draw(st.lists(st.integers(0, 3), min_size=1, max_size=R))
  n_unjudged = draw(st.integers(0, 4))
  pool = list(range(len(grades) + n_unjudged))  # ids >= len(grades) are unjudged
  ranking = draw(st.permutations(pool))[:draw(st.integers(0, min(L, len(pool))))]
  gains = [grades[d] if d < len(grades) else 0 for d in ranking]
  return grades, gains


@SETTINGS
@given(judged_and_ranking())
def test_ndcg_in_unit_interval(case):
  grades, gains = case
  for f in (ndcg10, ndcg_full):
    v = float(f(_pad([gains], L), _pad([grades], R))[0])
    assert 0.0 <= v <= 1.0 + 1e-6


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=1, max_size=R))
def test_perfect_ranking_scores_one(grades):
  ideal = sorted(grades, reverse=True)
  v10 = float(ndcg10(_pad([ideal], L), _pad([grades], R))[0])
  vfull = float(ndcg_full(_pad([ideal], L), _pad([grades], R))[0])
  expected = 1.0 if any(grades) else 0.0
  assert v10 == pytest.approx(expected, abs=1e-6) and vfull == pytest.approx(expected, abs=1e-6)


@SETTINGS
@given(judged_and_ranking(), st.randoms(use_true_random=False))
def test_recall_ignores_order_inside_cut(case, rnd):
  grades, gains = case
  head = gains[:5]
  rnd.shuffle(head)
  a = recall5(_pad([gains], L), _pad([grades], R))
  b = recall5(_pad([head + gains[5:]], L), _pad([grades], R))
  assert float(a[0]) == float(b[0])
  assert 0.0 <= float(a[0]) <= 1.0


@SETTINGS
@given(st.lists(st.integers(0, 1000), max_size=L, unique=True))
def test_rbo_of_list_with_itself(ids):
  row = _pad([ids], L, fill=-1)
  assert float(rbo1(row, row)[0]) == pytest.approx(1.0, abs=1e-6)
  # unextrapolated rbo of identical lists is sum_{d<k} (1-p) p^d = 1 - p^k (0 lists: 1 by definition)
  expected = 1.0 - 0.9 ** len(ids) if ids else 1.0
  assert float(rbo9(row, row)[0]) == pytest.approx(expected, abs=1e-6)


def _rbo_reference(S, T, p=1.0):
  """The `rbo` package's RankingSimilarity(S, T).rbo(p=p), restated with explicit overlaps."""
  if not S and not T:
    return 1.0
  if not S or not T:
    return 0.0
  k = min(len(S), len(T))
  agree = [len(set(S[:d]) & set(T[:d])) / d for d in range(1, k + 1)]
  if p == 1.0:
    return sum(agree) / k
  return sum((1 - p) * p ** (d - 1) * a for d, a in enumerate(agree, 1))


def test_rbo_matches_formula_on_random_lists():
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(300):
    n, m = rng.integers(0, L + 1, size=2)
    pairs.append((list(rng.permutation(24)[:n]), list(rng.permutation(24)[:m])))
  a = _pad([s for s, _ in pairs], L, -1)
  b = _pad([t for _, t in pairs], L, -1)
  for p, f in ((1.0, rbo1), (0.9, rbo9)):
    got = np.asarray(f(a, b))
    want = np.array([_rbo_reference(s, t, p) for s, t in pairs])
    np.testing.assert_allclose(got, want, atol=1e-6)
  # Different widths are fine and the measure is symmetric.
  np.testing.assert_allclose(M.rbo(a[:, :10], b), M.rbo(b, a[:, :10]), atol=1e-6)


def test_against_pytrec_eval_random_graded():
  rng = np.random.default_rng(1)
  qrels, run, gains, judged = {}, {}, [], []
  for q in range(64):
    n_judged = int(rng.integers(1, 30))
    grades = rng.integers(-1, 4, size=n_judged)  # -1: judged negative, clipped like trec_eval
    docs = [f"d{i}" for i in range(n_judged + 10)]
    qrels[f"q{q}"] = {f"d{i}": int(g) for i, g in enumerate(grades)}
    ranking = list(rng.permutation(docs)[:int(rng.integers(1, 40))])
    run[f"q{q}"] = {d: float(len(ranking) - r) for r, d in enumerate(ranking)}
    gains.append([qrels[f"q{q}"].get(d, 0) for d in ranking])
    judged.append(list(grades))
  g, j = _pad(gains, 40), _pad(judged, 32)
  measures = {"ndcg_cut.5,10", "recall.10,20", "recip_rank", "map_cut.10", "ndcg", "P.5"}
  for level in (1, 2):
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=level).evaluate(run)
    ours = {
      "ndcg_cut_5": M.ndcg_at_k(g, j, 5), "ndcg_cut_10": M.ndcg_at_k(g, j, 10),
      "recall_10": M.recall_at_k(g, j, 10, level), "recall_20": M.recall_at_k(g, j, 20, level),
      "recip_rank": M.mrr_at_k(g, None, level), "map_cut_10": M.map_at_k(g, j, 10, level),
      "ndcg": M.ndcg_at_k(g, j, None), "P_5": M.precision_at_k(g, 5, level),
    }
    for name, vals in ours.items():
      want = np.array([ref[f"q{q}"][name] for q in range(64)])
      np.testing.assert_allclose(np.asarray(vals), want, atol=2e-6, err_msg=f"{name} level {level}")


def test_mrr_cut_and_mask_and_vmap():
  gains = jnp.array([[0, 0, 0, 2, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], jnp.float32)
  judged = jnp.array([[2, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
  np.testing.assert_allclose(M.mrr_at_k(gains, 3), [0.0, 1.0])
  np.testing.assert_allclose(M.mrr_at_k(gains, 4), [0.25, 1.0])
  np.testing.assert_allclose(M.mrr_at_k(gains, None, rel_level=2), [0.25, 0.0])
  mask = jnp.arange(8)[None, :] < jnp.array([[4], [8]])
  np.testing.assert_allclose(M.ndcg_at_k(gains, judged, 10, mask_BxL=mask),
                             M.ndcg_at_k(gains.at[0, 4:].set(0), judged, 10), atol=1e-7)
  per_row = jax.vmap(lambda g, j: M.ndcg_at_k(g[None], j[None], 5)[0])
  np.testing.assert_allclose(jax.jit(per_row)(gains, judged), M.ndcg_at_k(gains, judged, 5), atol=1e-7)
  # Batched over a leading axis too: [2, B, L] through vmap of the batched function.
  stacked = jax.vmap(functools.partial(M.recall_at_k, k=5))(jnp.stack([gains, gains]), jnp.stack([judged] * 2))
  assert stacked.shape == (2, 2)
