"""Regenerates the tables of launch/SCALING.md from `python -m rrjax.preflight` (compile only; minutes per row).

    python launch/preflight_tables.py [--write launch/SCALING.md] [--only SUBSTRING]

Each row compiles one recipe (training, then reranking with --model) for one topology, one after another, and
prints the per-device figures the compiler reports. With --write, the text between the `<!-- preflight:begin -->`
and `<!-- preflight:end -->` markers (and `<!-- preflight-rerank:... -->` for reranking) of the file is replaced
(atomically); --only keeps the rows whose files or flags contain a substring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rrjax import fileio  # noqa: E402

GiB = 2**30
BEGIN, END = "<!-- preflight:begin -->", "<!-- preflight:end -->"

# (recipe gin files, extra bindings, topology, extra flags, what the row is)
ROWS = [
    (["configs/sft/reasonrank_7b.gin"], [], "cpu:8", ["--hbm", "80", "--chip", "H100"], "the recipe: 8 x H100 80 GB"),
    (["configs/sft/reasonrank_7b.gin", "configs/mesh/tpu_pod.gin"], ["TrainConfig.grad_accum = 16"], "v5p:2x2x1", [],
     "TPU alternative: v5p-8 (4 chips), fsdp 4"),
    (["configs/sft/reasonrank_32b_lora.gin"], [], "v5p:2x2x2", [], "the recipe: v5p-16 (8 chips)"),
    (["configs/grpo/reasonrank_7b.gin"], [], "cpu:8", ["--hbm", "80", "--chip", "H100"], "the recipe: 8 x H100 80 GB"),
    (["configs/grpo/reasonrank_32b_lora.gin"], [], "v5p:2x2x2", [], "the recipe: v5p-16 (8 chips)"),
    (["configs/sft/reasonrank_8b.gin"], [], "cpu:8", ["--hbm", "80"], "Qwen3-8B: 8 x H100 80 GB"),
    (["configs/grpo/reasonrank_8b.gin"], [], "cpu:8", ["--hbm", "141"], "Qwen3-8B: 8 x H200 141 GB"),
    (["configs/sft/tiny_cpu.gin"], [], "cpu:1", ["--platform", "cpu"], "the recipe: one CPU"),
    (["configs/grpo/tiny_cpu.gin"], [], "cpu:1", ["--platform", "cpu"], "the recipe: one CPU"),
]

# Reranking (`--model` selects it): (rerank gin files, extra bindings, topology, flags with --model, what)
RERANK_ROWS = [
    (["configs/rerank/reasonrank_7b_v5e.gin"], [], "v5e:2x2", ["--model", "qwen2_5_7b"],
     "7B: v5litepod-4, two replicas of tensor 2"),
    (["configs/rerank/reasonrank_32b_v5e.gin"], [], "v5e:2x4", ["--model", "qwen2_5_32b"],
     "32B: v5litepod-8, tensor 8"),
    (["configs/rerank/reasonrank_7b_v5e.gin", "configs/rerank/rank1.gin"], [], "v5e:2x2", ["--model", "qwen2_5_7b"],
     "Rank1-7B pointwise on the same slice"),
    (["configs/rerank/reasonrank_8b_v5e.gin"], [], "v5e:2x2", ["--model", "qwen3_8b"],
     "8B (Qwen3): v5litepod-4, tensor 4"),
    (["configs/rerank/reasonrank_8b.gin"], [], "cpu:1", ["--model", "qwen3_8b", "--hbm", "80"],
     "8B (Qwen3): one 80 GB GPU"),
    (["configs/rerank/reasonrank.gin"], [], "v5p:2x2x1", ["--model", "qwen2_5_32b"],
     "32B: v5p-8, default mesh"),
    (["configs/rerank/reasonrank.gin"], [], "cpu:1", ["--model", "qwen2_5_7b", "--hbm", "80", "--chip", "H100"],
     "7B: one 80 GB GPU"),
    (["configs/rerank/reasonrank.gin"], [], "cpu:2", ["--model", "qwen2_5_32b", "--hbm", "80", "--chip", "H100"],
     "32B: two 80 GB GPUs, default mesh"),
]
RERANK_BEGIN, RERANK_END = "<!-- preflight-rerank:begin -->", "<!-- preflight-rerank:end -->"


def preflight(files, params, topology, flags) -> tuple[dict | None, str, float]:
  cmd = [sys.executable, "-m", "rrjax.preflight", "--topology", topology, "--json", "--cost", *flags]
  for f in files:
    cmd += ["--gin_file", f]
  for p in params:
    cmd += ["--gin_param", p]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_PLATFORMS", None)
  t = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  rep = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
  reason = next((line for line in proc.stderr.splitlines() if "does not fit" in line or "error" in line), "")
  return rep, reason, time.time() - t


def gib(n) -> str:
  return f"{n / GiB:.1f}"


def render(results) -> str:
  out = ["| recipe | topology | devices | mesh (data, fsdp, tensor) | program: total (+ resident) GiB | peak GiB | "
         "HBM GiB | fits | program: FLOPs / useful, HBM bytes / useful | roofline: s per step, tokens/s, MFU ceiling "
         "| run: hours, chip-hours |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (files, params, topology, _, what), (rep, reason, _) in results:
    recipe = " + ".join(f"`{Path(f).relative_to('configs') if f.startswith('configs/') else f}`" for f in files)
    if params:
      recipe += " with " + ", ".join(f"`{p}`" for p in params)
    if rep is None:
      out.append(f"| {recipe} ({what}) | {topology} | | | failed: {reason} | | | | | | |")
      continue
    mesh = ", ".join(str(rep["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    progs = "; ".join(f"{p['name']} {'refused' if 'error' in p else gib(p['total_bytes'])}"
                      + (f" (+{gib(p['resident_bytes'])})" if p["resident_bytes"] else "") for p in rep["programs"])
    kind = f"{rep['devices']} x {rep['device_kind']}" + (f" ({rep['platform']} settings)" if topology.startswith("cpu")
                                                         else "")
    roof = (f"{num(rep.get('step_seconds'), '.3g')} s, {num(rep.get('tokens_per_second'), ',.0f')} tokens/s, "
            f"{num(rep.get('mfu_ceiling'), '.2f')}")
    run = f"{num(rep.get('run_hours'), '.1f')} h, {num(rep.get('chip_hours'), ',.0f')} chip-h" + (
        f" ({rep['run_steps']} steps)" if rep.get("run_steps") else " (epochs: --steps)")
    out.append(f"| {recipe} ({what}) | `{topology}` | {kind} | ({mesh}) | {progs} | {gib(rep['peak_bytes'])} | "
               f"{gib(rep['hbm_bytes'])} | {'yes' if rep['fits'] else 'no: ' + reason} | {ratios(rep)} | {roof} | "
               f"{run} |")
  return "\n".join(out)


def num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def ratios(rep) -> str:
  """Each program's compiled / useful FLOPs and HBM bytes (rrjax.cost), per device."""
  return "; ".join(f"{p['name']} {num(p['cost']['flops_ratio'], '.2f')}, {num(p['cost']['hbm_bytes_ratio'], '.1f')}"
                   for p in rep["programs"] if p.get("cost"))


def render_rerank(results) -> str:
  out = ["| rerank config | model | topology | devices | mesh (data, fsdp, tensor) | engine | program: total GiB | "
         "peak GiB | HBM GiB | fits | program: FLOPs / useful, HBM bytes / useful | roofline: s per window, "
         "queries/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (files, params, topology, flags, what), (rep, reason, _) in results:
    recipe = " + ".join(f"`{Path(f).relative_to('configs')}`" for f in files)
    model = flags[flags.index("--model") + 1]
    if rep is None or "rerank" not in rep:
      out.append(f"| {recipe} ({what}) | {model} | `{topology}` | | | | {reason or 'failed'} | | | no | | |")
      continue
    r = rep["rerank"]
    mesh = ", ".join(str(rep["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    engine = (f"{r['slots']} slots x {r['slot_length']}, prefill {r['prefill_group']} x {r['prefill_prompt']}"
              + (f" (chunks of {r['prefill_chunk']})" if r.get("prefill_chunk") else "")
              + (f"; scoring {r['score_slots']} x {r['score_slot_length']}" if "score_slots" in r else "")
              + f"; longest prompt {r['prompt_tokens']}")
    progs = "; ".join(f"{p['name']} {'refused' if 'error' in p else gib(p['total_bytes'])}" for p in rep["programs"])
    kind = f"{rep['devices']} x {rep['device_kind']}" + (f" ({rep['platform']} settings)" if topology.startswith("cpu")
                                                         else "")
    if r.get("hosts", 1) > 1:
      kind += f", one of {r['hosts']} hosts"
    out.append(f"| {recipe} ({what}) | {model} | `{topology}` | {kind} | ({mesh}) | {engine} | {progs} | "
               f"{gib(rep['peak_bytes'])} | {gib(rep['hbm_bytes'])} | {'yes' if rep['fits'] else 'no: ' + reason} | "
               f"{ratios(rep)} | {num(rep.get('window_seconds'), '.3g')} s, "
               f"{num(rep.get('queries_per_second'), '.3g')} queries/s |")
  return "\n".join(out)


def _replace(text: str, begin: str, end: str, table: str, path) -> str:
  if begin not in text or end not in text:
    raise SystemExit(f"{path}: no {begin} ... {end} markers")
  head, rest = text.split(begin, 1)
  return head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python launch/preflight_tables.py", description=__doc__.splitlines()[0])
  p.add_argument("--write", default=None, help="a markdown file with the preflight markers to update")
  p.add_argument("--only", default=None, help="only rows whose recipe contains this")
  args = p.parse_args(argv)
  tables = []
  for all_rows, render_rows in ((ROWS, render), (RERANK_ROWS, render_rerank)):
    rows = [r for r in all_rows if args.only is None or any(args.only in f for f in r[0] + r[3])]
    results = []
    for row in rows:
      rep, reason, seconds = preflight(*row[:4])
      print(f"{' + '.join(row[0])} {' '.join(row[3])} on {row[2]}: "
            f"{'failed ' + reason if rep is None else gib(rep['peak_bytes']) + ' GiB peak'} ({seconds:.0f} s)",
            file=sys.stderr, flush=True)
      results.append((row, (rep, reason, seconds)))
    tables.append(render_rows(results) if results else None)
    if results:
      print(tables[-1])
  if args.write:
    path = Path(args.write)
    text = path.read_text()
    for (begin, end), table in zip(((BEGIN, END), (RERANK_BEGIN, RERANK_END)), tables):
      if table is not None:
        text = _replace(text, begin, end, table, path)
    fileio.write_text(path, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
