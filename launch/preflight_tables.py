"""Regenerates the tables of launch/SCALING.md from `python -m rrjax.preflight` (compile only; minutes per row).

    python launch/preflight_tables.py [--write launch/SCALING.md] [--only SUBSTRING]

Each row compiles one recipe for one topology, one after another, and prints the per-device figures the
compiler reports. With --write, the text between the `<!-- preflight:begin -->` and `<!-- preflight:end -->`
markers of the file is replaced (atomically).
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
    (["configs/sft/reasonrank_7b.gin"], [], "cpu:8", ["--hbm", "80"], "the recipe: 8 x H100 80 GB"),
    (["configs/sft/reasonrank_7b.gin", "configs/mesh/tpu_pod.gin"], ["TrainConfig.grad_accum = 16"], "v5p:2x2x1", [],
     "TPU alternative: v5p-8 (4 chips), fsdp 4"),
    (["configs/sft/reasonrank_32b_lora.gin"], [], "v5p:2x2x2", [], "the recipe: v5p-16 (8 chips)"),
    (["configs/grpo/reasonrank_7b.gin"], [], "cpu:8", ["--hbm", "80"], "the recipe: 8 x H100 80 GB"),
    (["configs/grpo/reasonrank_32b_lora.gin"], [], "v5p:2x2x2", [], "the recipe: v5p-16 (8 chips)"),
    (["configs/sft/tiny_cpu.gin"], [], "cpu:1", ["--platform", "cpu"], "the recipe: one CPU"),
    (["configs/grpo/tiny_cpu.gin"], [], "cpu:1", ["--platform", "cpu"], "the recipe: one CPU"),
]


def preflight(files, params, topology, flags) -> tuple[dict | None, str, float]:
  cmd = [sys.executable, "-m", "rrjax.preflight", "--topology", topology, "--json", *flags]
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
         "HBM GiB | fits |", "|---|---|---|---|---|---|---|---|"]
  for (files, params, topology, _, what), (rep, reason, _) in results:
    recipe = " + ".join(f"`{Path(f).relative_to('configs') if f.startswith('configs/') else f}`" for f in files)
    if params:
      recipe += " with " + ", ".join(f"`{p}`" for p in params)
    if rep is None:
      out.append(f"| {recipe} ({what}) | {topology} | | | failed: {reason} | | | |")
      continue
    mesh = ", ".join(str(rep["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    progs = "; ".join(f"{p['name']} {'refused' if 'error' in p else gib(p['total_bytes'])}"
                      + (f" (+{gib(p['resident_bytes'])})" if p["resident_bytes"] else "") for p in rep["programs"])
    kind = f"{rep['devices']} x {rep['device_kind']}" + (f" ({rep['platform']} settings)" if topology.startswith("cpu")
                                                         else "")
    out.append(f"| {recipe} ({what}) | `{topology}` | {kind} | ({mesh}) | {progs} | {gib(rep['peak_bytes'])} | "
               f"{gib(rep['hbm_bytes'])} | {'yes' if rep['fits'] else 'no: ' + reason} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python launch/preflight_tables.py", description=__doc__.splitlines()[0])
  p.add_argument("--write", default=None, help="a markdown file with the preflight markers to update")
  p.add_argument("--only", default=None, help="only rows whose recipe contains this")
  args = p.parse_args(argv)
  rows = [r for r in ROWS if args.only is None or any(args.only in f for f in r[0])]
  results = []
  for row in rows:
    rep, reason, seconds = preflight(*row[:4])
    print(f"{' + '.join(row[0])} on {row[2]}: "
          f"{'failed ' + reason if rep is None else gib(rep['peak_bytes']) + ' GiB peak'} ({seconds:.0f} s)",
          file=sys.stderr, flush=True)
    results.append((row, (rep, reason, seconds)))
  table = render(results)
  print(table)
  if args.write:
    path = Path(args.write)
    text = path.read_text()
    if BEGIN not in text or END not in text:
      raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    fileio.write_text(path, head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
  return 0


if __name__ == "__main__":
  sys.exit(main())
