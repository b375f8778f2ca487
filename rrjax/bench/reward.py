"""Reward benchmark: `python -m rrjax.bench.reward [--rollouts 128] [--ids 20] [--repeats 20]`.

Times rrjax's batched reward (host parsing + one jitted call, after warm-up) against upstream's way:
a Python loop that runs regex, pytrec_eval and the rbo package's loop per rollout (verl's reward
manager calls compute_score once per sample). Both run in this process on the same inputs, and the
script checks that they agree. The rbo package itself is not installed (it pins numpy<2); its
p=1.0 loop is restated below step for step. Needs pytrec_eval-terrier for the peer.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time

import jax
import numpy as np

from rrjax.ranking import reward as rw


def _clean(s: str) -> str:
  new = ""
  for c in s:  # upstream builds the string char by char; kept for a faithful timing
    new += c if c.isdigit() else " "
  return new.strip()


def _rbo_p1(S, T) -> float:
  if not S and not T:
    return 1.0
  if not S or not T:
    return 0.0
  k = min(len(S), len(T))
  A, AO = [0.0] * k, [0.0] * k
  S_run, T_run = {S[0]: True}, {T[0]: True}
  A[0] = AO[0] = 1.0 if S[0] == T[0] else 0.0
  for d in range(1, k):
    tmp = (S[d] in T_run) + (T[d] in S_run) + (S[d] == T[d])
    A[d] = 1.0 * ((A[d - 1] * d) + tmp) / (d + 1)
    AO[d] = ((AO[d - 1] * d) + A[d]) / (d + 1)
    S_run[S[d]] = True
    T_run[T[d]] = True
  return AO[-1]


def upstream_compute_score(predict_str, ground_truth, initial_list, relevant_docids, pytrec_eval):
  """upstream verl/utils/reward_score/ranking.py compute_score, one sample."""
  match = re.search(r"<think>.*?</think>\s*<answer>(.*?)</answer>", predict_str, re.DOTALL)
  if not match:
    return -1
  pred = _clean(match.group(1)).split()
  label = _clean(ground_truth).split()
  if len(pred) == len(label) and len(set(pred)) == len(set(label)):
    try:
      idxs = [int(x) - 1 for x in pred]
    except ValueError:
      return 0
    docids = [initial_list[i] for i in idxs if i < len(initial_list)]
    run = {"1": {d: -(i + 1) for i, d in enumerate(docids)}}
    gt = {"1": {d: 1 for d in relevant_docids}}
    res = pytrec_eval.RelevanceEvaluator(gt, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    return res["1"]["ndcg_cut_10"] + 0.2 * res["1"]["recall_10"] + 0.1 * _rbo_p1(pred, label)
  return 0


def make_rollouts(n: int, ids: int, seed: int = 0):
  """GRPO-like rollouts: 8 per prompt, mostly valid permutations, some malformed."""
  rnd = random.Random(seed)
  completions, golds, inits, rels = [], [], [], []
  for i in range(n):
    rnd_prompt = random.Random(seed * 100003 + i // 8)
    init = [f"doc{rnd_prompt.randrange(10**7)}" for _ in range(ids)]
    gold_ids = rnd_prompt.sample(range(1, ids + 1), ids)
    rel = rnd_prompt.sample(init, rnd_prompt.randint(1, 6))
    perm = rnd.sample(range(1, ids + 1), ids)
    roll = rnd.random()
    if roll < 0.1:
      perm = perm[:-1]
    elif roll < 0.15:
      perm[0] = perm[1]
    think = " ".join(f"Passage [{j}] discusses topic {rnd.randrange(100)}." for j in range(1, ids + 1))
    answer = " > ".join(f"[{j}]" for j in perm)
    text = f"<think>{think}</think>\n<answer>{answer}</answer>" if roll > 0.03 else f"<think>{think}"
    completions.append(text)
    golds.append(" > ".join(f"[{j}]" for j in gold_ids))
    inits.append(init)
    rels.append(rel)
  return completions, golds, inits, rels


def _time(fn, repeats: int) -> tuple[float, float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.reward", description=__doc__.split("\n")[0])
  ap.add_argument("--rollouts", type=int, default=128)
  ap.add_argument("--ids", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args(argv)
  batch = make_rollouts(args.rollouts, args.ids)

  def ours():
    return rw.batch_rewards(*batch)

  samples = [rw.parse_sample(c, g, i) for c, g, i in zip(*batch[:3])]
  inputs = rw.encode_batch(samples, batch[3])
  ours()  # warm-up: compiles the padded shapes once
  jax.block_until_ready(rw.compute_rewards(inputs))
  ours_med, ours_min = _time(ours, args.repeats)
  jit_med, _ = _time(lambda: jax.block_until_ready(rw.compute_rewards(inputs)), args.repeats)
  parse_med, _ = _time(lambda: rw.encode_batch([rw.parse_sample(c, g, i) for c, g, i in zip(*batch[:3])],
                                               batch[3]), args.repeats)

  print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{args.rollouts} rollouts x {args.ids} ids, median of {args.repeats}")
  print(f"rrjax batch_rewards (parse + 1 jitted call): {ours_med * 1e3:8.3f} ms  (min {ours_min * 1e3:.3f})")
  print(f"  of which host parse+pad:                   {parse_med * 1e3:8.3f} ms")
  print(f"  of which jitted metrics (pre-padded):      {jit_med * 1e3:8.3f} ms")
  try:
    import pytrec_eval
  except ImportError:
    print("peer: pytrec_eval not installed; install pytrec_eval-terrier to time upstream's loop")
    return 0

  def peer():
    return [upstream_compute_score(c, g, i, r, pytrec_eval) for c, g, i, r in zip(*batch)]

  peer()
  peer_med, peer_min = _time(peer, args.repeats)
  diff = float(np.max(np.abs(np.asarray(peer(), np.float64) - ours().reward)))
  print(f"upstream loop (regex + pytrec_eval + rbo):   {peer_med * 1e3:8.3f} ms  (min {peer_min * 1e3:.3f})")
  print(f"speed-up (upstream / rrjax, medians):        {peer_med / ours_med:8.2f}x")
  print(f"max |reward difference|:                     {diff:.2e}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
