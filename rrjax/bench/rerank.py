"""Rerank benchmark: `python -m rrjax.bench.rerank [--queries 4] [--slots 4] [--max-new-tokens 64]
[--preset tiny] [--layers N] [--with-full] [--json]`.

On a random model (Qwen2.5 vocabulary, tiny by default) over the real TREC DL19 BM25 top-100 with 100-token
passages, every reasoning chain gets a scripted length (stop ids off), drawn as in rrjax.bench.engine: a
clipped log-normal with mean about a quarter of --max-new-tokens, fixed per prompt (a hash of its text), so
that every schedule decodes the same chains. At equal slots (--slots) we time, per query:
- listwise ReasonRank, async: each query's next window starts as soon as its last one ends;
- listwise ReasonRank, lockstep: every query's k-th window in one round (upstream's schedule);
- pointwise Rank1: 100 prompts per query, each reasoning then scoring true/false after `</think>`;
- with --with-full, full-list: one prompt over all 100 passages (first query only: ~10k tokens).
Each timed run follows the same run once, which compiles its programs. The paper reports listwise
2-2.7x faster than Rank1 (7B models on GPUs, their chains); the ratio printed is ours for the chain lengths
stated. A random model's chains have no content: this measures the work shape (prompt/chain counts and
lengths, the schedule), not quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "trec" / "BM25.dl19.top100.rankgpt.json.gz"
PAPER_SPEEDUP = (2.0, 2.7)  # listwise vs Rank1 pointwise, ReasonRank paper


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.rerank", description=__doc__.split("\n")[0])
  ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="RankGPT json with run, queries and passages")
  ap.add_argument("--queries", type=int, default=4, help="DL19 queries (43 for all)")
  ap.add_argument("--slots", type=int, default=4, help="decode slots, the same in every mode")
  ap.add_argument("--max-new-tokens", type=int, default=64, help="the chain-length cap (mean about a quarter)")
  ap.add_argument("--max-passage-tokens", type=int, default=100, help="upstream's DL/BEIR cut")
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--with-full", action="store_true", help="also time full-list mode on the first query")
  ap.add_argument("--skip", default="", help="comma list of modes to skip: async,lockstep,pointwise")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}

  import jax
  import numpy as np

  from rrjax import rerank as rr
  from rrjax import tokenizer as tokenizer_lib
  from rrjax.bench import random_model
  from rrjax.bench.engine import scripted_lengths
  from rrjax.data.inputs import load_inputs

  inputs = load_inputs(args.corpus, max_queries=args.queries)
  queries = inputs.queries
  n = len(queries)
  config, model, mesh = random_model(args.preset, args.layers, args.dtype)
  dtype = config.dtype
  tok = tokenizer_lib.load()
  pool = scripted_lengths(4096, args.max_new_tokens)

  def budget(prompt) -> int:  # the same chain for the same prompt, whichever schedule asks
    return pool[zlib.crc32(str(prompt).encode()) % len(pool)]

  base = rr.RerankSettings(max_new_tokens=args.max_new_tokens, max_passage_tokens=args.max_passage_tokens,
                           batch_size=args.slots)
  runs = {"async": dataclasses.replace(base, schedule="async"),
          "lockstep": dataclasses.replace(base, schedule="lockstep"),
          "pointwise": dataclasses.replace(base, mode="pointwise")}
  if args.with_full:
    runs["full"] = dataclasses.replace(base, mode="full", batch_size=1)
  print(f"model: random {config.name} ({config.param_count() / 1e6:.1f}M parameters, {config.num_layers} layers, "
        f"{dtype}), {jax.devices()[0].device_kind}; {n} DL19 queries x {len(queries[0].candidates)} BM25 candidates, "
        f"passages cut to {args.max_passage_tokens} tokens; {args.slots} slots; chains scripted: mean "
        f"{np.mean(pool):.0f}, cap {args.max_new_tokens} tokens")

  rows = {}
  for name, settings in runs.items():
    if name in skip:
      continue
    timed = queries[:1] if name == "full" else queries
    rr.rerank(timed, model, tok, settings, mesh=mesh, budget=budget)  # warm-up: the same run compiles it all
    t0 = time.perf_counter()
    out = rr.rerank(timed, model, tok, settings, mesh=mesh, budget=budget)
    seconds = time.perf_counter() - t0
    totals = rr.build_report(settings, out)["totals"]
    chains = totals.get("windows", totals.get("prompts"))
    rows[name] = {"queries": len(timed), "chains": chains, "seconds": seconds, "chains_per_second": chains / seconds,
                  "seconds_per_query": seconds / len(timed), "prompt_tokens": totals["prompt_tokens"],
                  "generated_tokens": totals["generated_tokens"], "occupancy": totals.get("occupancy"),
                  "prefill_seconds": totals.get("prefill_seconds"), "decode_seconds": totals.get("decode_seconds")}

  print(f"\n{'mode':<10}{'chains/q':>10}{'prompt tok/q':>14}{'gen tok/q':>11}{'chains/s':>10}{'s/q':>9}"
        f"{'occupancy':>11}")
  for name, r in rows.items():
    k = r["queries"]
    occ = f"{r['occupancy']:.0%}" if r["occupancy"] is not None else "-"
    print(f"{name:<10}{r['chains'] / k:>10.1f}{r['prompt_tokens'] / k:>14.0f}{r['generated_tokens'] / k:>11.0f}"
          f"{r['chains_per_second']:>10.2f}{r['seconds_per_query']:>9.2f}{occ:>11}")
  summary = {}
  if "async" in rows and "lockstep" in rows:
    ratio = rows["async"]["chains_per_second"] / rows["lockstep"]["chains_per_second"]
    summary["async_vs_lockstep_windows_per_s"] = ratio
    print(f"async / lockstep windows/s: {summary['async_vs_lockstep_windows_per_s']:.2f}x")
  listwise = rows.get("async") or rows.get("lockstep")
  if listwise and "pointwise" in rows:
    summary["listwise_speedup_vs_rank1"] = rows["pointwise"]["seconds_per_query"] / listwise["seconds_per_query"]
    print(f"Rank1 pointwise / listwise time per query: {summary['listwise_speedup_vs_rank1']:.2f}x with chains of "
          f"mean {np.mean(pool):.0f} tokens (cap {args.max_new_tokens}) in both (paper: listwise "
          f"{PAPER_SPEEDUP[0]}-{PAPER_SPEEDUP[1]}x faster, 7B models on GPUs)")
  if args.json:
    print(json.dumps({"model": config.name, "layers": config.num_layers, "device": jax.devices()[0].device_kind,
                      "queries": n, "slots": args.slots, "chain_mean": float(np.mean(pool)),
                      "chain_cap": args.max_new_tokens, "modes": rows, **summary}))
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.rerank")
