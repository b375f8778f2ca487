"""ReasonRank's multi-view GRPO reward, batched: parse on the host, score in one jitted call.

Semantics are upstream's `compute_score` (8421BCD/ReasonRank verl/verl/utils/reward_score/ranking.py):

  -1  if re.search(r'<think>.*?</think>\\s*<answer>(.*?)</answer>', completion, re.DOTALL) fails
      (case-sensitive: `<Answer>` fails);
   0  unless the answer's ids (maximal runs of str.isdigit() characters) number exactly as many as
      the gold ranking's, with as many distinct strings, and all convert with int();
  else ndcg@10 + 0.2 * recall@10 + 0.1 * rbo
      - ndcg/recall (pytrec_eval ndcg_cut_10/recall_10, binary gains) of the docids the answer
        picks from `initial_list`, against `relevant_docids`;
      - rbo = the `rbo` package's RankingSimilarity(pred_ids, gold_ids).rbo() with its default
        p=1.0: average overlap to depth N, over the id *strings*.

Upstream quirks kept on purpose:
- id "0" (or "00") is int 0 - 1 = -1, which Python indexing turns into the *last* passage;
- ids past the window are dropped (`idx < len(initial_list)`), so the ranked list gets shorter;
- distinctness is on strings, so "01" and "1" both pass and both select passage 1; the run dict
  `{docid: -(idx+1)}` then keeps the docid once, at its *last* position (dict-update semantics);
- digits are Unicode-aware: "٣" counts as 3, while "²" passes isdigit() but fails int() -> 0;
- `relevant_docids` and docids are compared as strings (pytrec_eval only takes str keys).
Cases where upstream raises instead of scoring, scored here as noted: no relevant docids
(pytrec_eval drops the query, upstream KeyErrors) -> ndcg = recall = 0; an empty `initial_list`
-> no docids; a gold ranking with repeated ids (the rbo package asserts) -> rbo counts pairs.
Rewards are computed in float32 (about 1e-7 from upstream's float64).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrjax.ranking import metrics
from rrjax.ranking.parse import ANSWER_RE, answer_ids

NDCG_K = 10
RECALL_K = 10
RECALL_WEIGHT = 0.2
RBO_WEIGHT = 0.1


@dataclasses.dataclass(frozen=True)
class ParsedSample:
  """One completion after upstream's host-side parsing."""
  format_ok: bool
  answer_ok: bool
  ranked_docids: tuple[str, ...]  # what pytrec_eval ranks: deduplicated, by last occurrence
  pred_ids: tuple[str, ...]       # answer id strings (for rbo)
  gold_ids: tuple[str, ...]


def parse_sample(completion: str, gold_ranking: str, initial_list: Sequence[str]) -> ParsedSample:
  """Apply upstream's regex, count check, int() and index rules to one completion."""
  gold_ids = tuple(answer_ids(gold_ranking))
  match = ANSWER_RE.search(completion)  # on the raw text: unlike the parser, case-sensitive
  if match is None:
    return ParsedSample(False, False, (), (), gold_ids)
  pred_ids = tuple(answer_ids(match.group(1)))
  if len(pred_ids) != len(gold_ids) or len(set(pred_ids)) != len(set(gold_ids)):
    return ParsedSample(True, False, (), pred_ids, gold_ids)
  try:
    idxs = [int(x) - 1 for x in pred_ids]
  except ValueError:  # e.g. superscript digits: isdigit() but not int()-able
    return ParsedSample(True, False, (), pred_ids, gold_ids)
  n = len(initial_list)
  docids = [str(initial_list[i]) for i in idxs if i < n and n > 0]
  last = {d: pos for pos, d in enumerate(docids)}  # dict-update: a repeated docid keeps its last slot
  ranked = tuple(sorted(last, key=last.__getitem__))
  return ParsedSample(True, True, ranked, pred_ids, gold_ids)


class RewardInputs(NamedTuple):
  """Padded arrays for `compute_rewards` (B rows; padding rows have format_ok False)."""
  gains_BxL: np.ndarray      # 1.0 where the ranked docid is relevant
  judged_BxR: np.ndarray     # 1.0 for each distinct relevant docid of the sample
  pred_ids_BxN: np.ndarray   # answer ids as per-sample integer codes, -1 padded
  gold_ids_BxN: np.ndarray   # gold ids, same code book, -1 padded
  format_ok_B: np.ndarray
  answer_ok_B: np.ndarray


class RewardBreakdown(NamedTuple):
  """The reward and its parts, one entry per sample."""
  reward: np.ndarray
  format_ok: np.ndarray
  answer_ok: np.ndarray
  ndcg10: np.ndarray
  recall10: np.ndarray
  rbo: np.ndarray


def _bucket(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, n - 1).bit_length())


def encode_batch(samples: Sequence[ParsedSample], relevant_docids_list: Sequence[Sequence[str]],
                 pad_batch_to: int | None = None) -> RewardInputs:
  """Pad parsed samples to power-of-two shapes (list width >= 32, batch >= 8)."""
  n = len(samples)
  B = pad_batch_to or _bucket(n, 8)
  if B < n:
    raise ValueError(f"pad_batch_to={B} is smaller than the batch ({n})")
  rel_sets = [{str(d) for d in rel} for rel in relevant_docids_list]
  L = _bucket(max([len(s.ranked_docids) for s in samples] + [1]), 32)
  N = _bucket(max([max(len(s.pred_ids), len(s.gold_ids)) for s in samples] + [1]), 32)
  R = _bucket(max([len(r) for r in rel_sets] + [1]), 32)
  gains = np.zeros((B, L), np.float32)
  judged = np.zeros((B, R), np.float32)
  pred = np.full((B, N), -1, np.int32)
  gold = np.full((B, N), -1, np.int32)
  fmt = np.zeros((B,), bool)
  ans = np.zeros((B,), bool)
  for i, (s, rel) in enumerate(zip(samples, rel_sets)):
    fmt[i], ans[i] = s.format_ok, s.answer_ok
    judged[i, :len(rel)] = 1.0
    if not s.answer_ok:
      continue
    gains[i, :len(s.ranked_docids)] = [d in rel for d in s.ranked_docids]
    codes: dict[str, int] = {}
    gold[i, :len(s.gold_ids)] = [codes.setdefault(x, len(codes)) for x in s.gold_ids]
    pred[i, :len(s.pred_ids)] = [codes.setdefault(x, len(codes)) for x in s.pred_ids]
  return RewardInputs(gains, judged, pred, gold, fmt, ans)


@jax.jit
def compute_rewards(inputs: RewardInputs) -> RewardBreakdown:
  """All metrics and the combined reward for a padded batch, in one XLA computation."""
  ndcg_B = metrics.ndcg_at_k(inputs.gains_BxL, inputs.judged_BxR, NDCG_K)
  recall_B = metrics.recall_at_k(inputs.gains_BxL, inputs.judged_BxR, RECALL_K)
  rbo_B = metrics.rbo(inputs.pred_ids_BxN, inputs.gold_ids_BxN, p=1.0)
  ok_B = jnp.asarray(inputs.answer_ok_B)
  zero = jnp.zeros_like(ndcg_B)
  ndcg_B, recall_B, rbo_B = (jnp.where(ok_B, x, zero) for x in (ndcg_B, recall_B, rbo_B))
  combined_B = ndcg_B + RECALL_WEIGHT * recall_B + RBO_WEIGHT * rbo_B
  reward_B = jnp.where(inputs.format_ok_B, jnp.where(ok_B, combined_B, 0.0), -1.0)
  return RewardBreakdown(reward_B, jnp.asarray(inputs.format_ok_B), ok_B, ndcg_B, recall_B, rbo_B)


def batch_rewards(completions: Sequence[str], gold_rankings: Sequence[str],
                  initial_lists: Sequence[Sequence[str]], relevant_docids_list: Sequence[Sequence[str]],
                  pad_batch_to: int | None = None) -> RewardBreakdown:
  """Rewards for a batch of rollouts: host parsing, one jitted call, numpy arrays of length B."""
  n = len(completions)
  if not (len(gold_rankings) == len(initial_lists) == len(relevant_docids_list) == n):
    raise ValueError("batch_rewards: all arguments must have the same length")
  if n == 0:
    empty_f, empty_b = np.zeros((0,), np.float32), np.zeros((0,), bool)
    return RewardBreakdown(empty_f, empty_b, empty_b, empty_f, empty_f, empty_f)
  samples = [parse_sample(c, g, init) for c, g, init in zip(completions, gold_rankings, initial_lists)]
  out = compute_rewards(encode_batch(samples, relevant_docids_list, pad_batch_to))
  return RewardBreakdown(*(np.asarray(x)[:n] for x in out))


def reward_score(completion: str, gold_ranking: str, initial_list: Sequence[str],
                 relevant_docids: Sequence[str]) -> float:
  """Upstream's compute_score for one sample."""
  return float(batch_rewards([completion], [gold_ranking], [initial_list], [relevant_docids]).reward[0])
