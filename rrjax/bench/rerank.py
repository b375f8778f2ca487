"""Rerank benchmark: `python -m rrjax.bench.rerank [--queries 8] [--reasoning-tokens 32] [--layers N]`.

On a random model (Qwen2.5 vocabulary, tiny by default) over the real TREC DL19 BM25 top-100, every
reasoning chain gets the same fixed budget (min_new_tokens = max_new_tokens, so no chain stops early) and
we time, per query:
- listwise ReasonRank: 9 windows of 20, every query's k-th window in one batch (lockstep);
- pointwise Rank1: 100 prompts per query, each reasoning then scoring true/false after `</think>`;
- full-list: one prompt over all 100 passages;
and listwise lockstep over all the queries against one query at a time. The paper reports listwise
2-2.7x faster than Rank1. Timed runs follow a warm-up that compiles their programs: the same run for
lockstep listwise, the first query alone where one query's calls have the same shapes as the rest
(full-list and one-at-a-time run one row per call; pointwise runs `--pointwise-batch-size` rows per call).
Full-list is timed on the first `--full-queries` queries only: one ~10k-token prefill is slow on a CPU.
On CPU the tiny model's prefill (quadratic attention over ~2k-token windows) dominates; with thousands of
reasoning tokens, as in the paper, decode does.
A random model's chains have no content: this measures the work shape (prompt/chain counts and lengths),
not quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "trec" / "BM25.dl19.top100.rankgpt.json.gz"
PAPER_SPEEDUP = (2.0, 2.7)  # listwise vs Rank1 pointwise, ReasonRank paper


def _timed(fn, warmup=None):
  """Seconds of fn() after warmup() (default: fn itself) has compiled the programs it needs."""
  (warmup or fn)()
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.rerank", description=__doc__.split("\n")[0])
  ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="RankGPT json with run, queries and passages")
  ap.add_argument("--queries", type=int, default=4, help="DL19 queries (43 for all)")
  ap.add_argument("--reasoning-tokens", type=int, default=32, help="tokens per reasoning chain, every mode")
  ap.add_argument("--max-passage-tokens", type=int, default=100, help="upstream's DL/BEIR cut")
  ap.add_argument("--batch-size", type=int, default=None, help="listwise rows per decode call (default: all)")
  ap.add_argument("--pointwise-batch-size", type=int, default=128, help="Rank1 rows per decode call")
  ap.add_argument("--full-batch-size", type=int, default=1, help="full-list rows per call (~10k-token prompts)")
  ap.add_argument("--full-queries", type=int, default=1, help="queries timed in full-list mode (slow on CPU)")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--skip", default="", help="comma list of parts to skip: pointwise,full,one-at-a-time")
  args = ap.parse_args(argv)
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}

  import jax
  from flax import nnx

  from rrjax import rerank as rr
  from rrjax.data.inputs import load_inputs
  from rrjax import tokenizer as tokenizer_lib
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  inputs = load_inputs(args.corpus, max_queries=args.queries)
  queries = inputs.queries
  n = len(queries)
  config = Qwen2Config.tiny(num_layers=args.layers)
  model = Qwen2(config, rngs=nnx.Rngs(0))
  tok = tokenizer_lib.load()
  budget = args.reasoning_tokens
  base = rr.RerankSettings(max_new_tokens=budget, min_new_tokens=budget, max_passage_tokens=args.max_passage_tokens,
                           batch_size=args.batch_size)
  print(f"model: random {config.name} ({config.param_count() / 1e6:.1f}M parameters, {config.num_layers} layers), "
        f"{jax.device_count()} {jax.default_backend()} device(s) [{jax.devices()[0].device_kind}]")
  print(f"data: {n} DL19 queries x {len(queries[0].candidates)} BM25 candidates; {budget} reasoning tokens per "
        f"chain; passages cut to {args.max_passage_tokens} tokens")

  rows = []
  first = queries[:1]
  batch = {"listwise": args.batch_size, "pointwise": args.pointwise_batch_size, "full": args.full_batch_size}
  lockstep = None
  for mode in [m for m in ("listwise", "pointwise", "full") if m not in skip]:
    settings = dataclasses.replace(base, mode=mode, batch_size=batch[mode])
    run = lambda qs, s=settings: rr.rerank(qs, model, tok, s)
    # Only lockstep listwise puts all queries in one call, so only it needs the full set to warm up.
    timed = queries[:args.full_queries] if mode == "full" else queries
    out, seconds = _timed(lambda: run(timed), None if mode == "listwise" else lambda: run(first))
    lockstep = seconds if mode == "listwise" else lockstep
    totals = rr.build_report(settings, out)["totals"]
    chains, k = totals.get("windows", totals.get("prompts")), len(timed)
    rows.append((mode, chains / k, totals["prompt_tokens"] / k, totals["generated_tokens"] / k, seconds / k))

  print(f"\n{'mode':<10}{'chains/q':>10}{'prompt tok/q':>14}{'gen tok/q':>11}{'s/q':>9}{'x listwise':>12}")
  listwise_s = rows[0][4] if rows and rows[0][0] == "listwise" else None
  for mode, chains, ptok, gtok, s in rows:
    ratio = f"{s / listwise_s:.2f}" if listwise_s else "-"
    print(f"{mode:<10}{chains:>10.1f}{ptok:>14.0f}{gtok:>11.0f}{s:>9.3f}{ratio:>12}")
  pointwise = next((r for r in rows if r[0] == "pointwise"), None)
  if listwise_s and pointwise:
    print(f"Rank1 pointwise / listwise time per query: {pointwise[4] / listwise_s:.2f}x "
          f"(paper: listwise {PAPER_SPEEDUP[0]}-{PAPER_SPEEDUP[1]}x faster, 7B models on GPUs)")

  if "one-at-a-time" not in skip:
    settings = dataclasses.replace(base, mode="listwise", batch_size=None)
    if lockstep is None:
      _, lockstep = _timed(lambda: rr.rerank(queries, model, tok, settings))
    _, single = _timed(lambda: [rr.rerank([q], model, tok, settings) for q in queries],
                       lambda: rr.rerank(first, model, tok, settings))
    print(f"\nlistwise over {n} queries: lockstep {lockstep:.2f}s (9 rounds of {n} windows) vs one query at a "
          f"time {single:.2f}s ({9 * n} calls of 1 window): one-at-a-time / lockstep = {single / lockstep:.2f}x")
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.rerank")
