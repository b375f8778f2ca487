"""Serving benchmark: `python -m rrjax.bench.serve [--model PATH | --url URL] [--requests 16] [--documents 15]
[--max-new-tokens 32] [--json]`.

Requests/s and p50/p95 latency of POST /v1/rerank at 1, 4 and 16 concurrent clients against one server (started
here as `python -m rrjax.serve` on 127.0.0.1, unless --url names one), with the engine's slot occupancy over each
level (from /metrics). Each request reranks one TREC DL19 query's BM25 top --documents (windows of 10, stride 5:
two windows for 15). Without --model, a tiny random model (Qwen2.5 vocabulary) is written to a temporary
directory: its windows write all --max-new-tokens tokens (it never stops), so every level decodes the same work.
A warm-up round at the highest concurrency compiles the programs first. The windows of concurrent requests share
the decode slots, so requests/s should grow with the clients: the goal on a CPU with the tiny model is at least 3x
at 16 clients over 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "trec" / "BM25.dl19.top100.rankgpt.json.gz"
LEVELS = (1, 4, 16)
GOAL = 3.0  # requests/s at 16 clients over 1 (the goal on a CPU with a tiny model)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metrics(client) -> dict[str, float]:
  out = {}
  for line in client.get("/metrics").text.splitlines():
    if line and not line.startswith("#"):
      key, _, value = line.rpartition(" ")
      out[key] = float(value)
  return out


def _percentile(values, q: float) -> float:
  v = sorted(values)
  return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def _start_server(model: str, port: int, args) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "rrjax.serve", "--model", model, "--port", str(port), "--window", "10", "--stride", "5",
         "--max-passage-tokens", str(args.max_passage_tokens), "--max-new-tokens", str(args.max_new_tokens),
         "--batch-size", str(args.slots)]
  return subprocess.Popen(cmd, stderr=None if args.verbose else subprocess.DEVNULL)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.serve", description=__doc__.split("\n")[0])
  ap.add_argument("--model", help="an HF directory or rrjax run (default: a tiny random model)")
  ap.add_argument("--url", help="an rrjax.serve already running (its settings apply; --model is then ignored)")
  ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="RankGPT json: the queries and their passages")
  ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
  ap.add_argument("--documents", type=int, default=15, help="documents per request")
  ap.add_argument("--max-new-tokens", type=int, default=32, help="per window (server started here)")
  ap.add_argument("--max-passage-tokens", type=int, default=30, help="server started here")
  ap.add_argument("--slots", type=int, default=16, help="decode slots (server started here)")
  ap.add_argument("--verbose", action="store_true", help="show the server's stderr")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  import httpx

  from rrjax.data.inputs import load_inputs

  queries = load_inputs(args.corpus).queries
  bodies = [{"query": q.text, "documents": [c.doc["text"] for c in q.candidates[:args.documents]]} for q in queries]
  proc, tmp = None, None
  url = args.url
  if url is None:
    model = args.model
    if model is None:
      tmp = tempfile.TemporaryDirectory()
      model = os.path.join(tmp.name, "tiny")
      from flax import nnx

      from rrjax.model.hf import save_pretrained
      from rrjax.model.qwen2 import Qwen2, Qwen2Config
      save_pretrained(Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(0)), model)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(model, port, args)
  client = httpx.Client(base_url=url, timeout=600)
  try:
    deadline = time.monotonic() + 300
    while True:
      if proc is not None and proc.poll() is not None:
        raise ValueError(f"the server exited with {proc.returncode} (--verbose shows why)")
      try:
        if client.get("/health").status_code == 200:
          break
      except httpx.TransportError:
        pass
      if time.monotonic() > deadline:
        raise ValueError(f"{url} did not answer /health within 300 s")
      time.sleep(0.2)

    def one(k: int) -> float:
      t0 = time.perf_counter()
      r = client.post("/v1/rerank", json=bodies[k % len(bodies)])
      if r.status_code != 200:
        raise ValueError(f"request {k}: HTTP {r.status_code}: {r.text[:200]}")
      return time.perf_counter() - t0

    def level(c: int, n: int) -> dict:
      before = _metrics(client)
      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(c) as pool:
        lat = list(pool.map(one, range(n)))
      wall = time.perf_counter() - t0
      after = _metrics(client)
      steps = after.get("rrjax_slot_steps_total", 0) - before.get("rrjax_slot_steps_total", 0)
      live = after.get("rrjax_live_slot_steps_total", 0) - before.get("rrjax_live_slot_steps_total", 0)
      return {"concurrency": c, "requests": n, "seconds": wall, "requests_per_second": n / wall,
              "p50_s": _percentile(lat, 0.5), "p95_s": _percentile(lat, 0.95),
              "slot_occupancy": live / steps if steps else 0.0,
              "windows": after.get("rrjax_windows_total", 0) - before.get("rrjax_windows_total", 0)}

    level(max(LEVELS), max(LEVELS))  # warm-up: compiles every program the levels use
    rows = [level(c, args.requests) for c in LEVELS]
  finally:
    client.close()
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=120)
    if tmp is not None:
      tmp.cleanup()
  speedup = rows[-1]["requests_per_second"] / rows[0]["requests_per_second"]
  if args.json:
    print(json.dumps({"levels": rows, "speedup_16_over_1": speedup, "goal": GOAL}, indent=2))
  else:
    print(f"{'clients':>7} {'requests/s':>11} {'p50 s':>7} {'p95 s':>7} {'slot occupancy':>15} {'windows':>8}")
    for r in rows:
      print(f"{r['concurrency']:>7} {r['requests_per_second']:>11.2f} {r['p50_s']:>7.2f} {r['p95_s']:>7.2f} "
            f"{r['slot_occupancy']:>15.2f} {r['windows']:>8.0f}")
    print(f"requests/s at 16 clients over 1: {speedup:.2f}x (goal >= {GOAL:g}x)")
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.serve")
