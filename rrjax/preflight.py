"""python -m rrjax.preflight --gin_file F [--gin_file F2] [--gin_param 'x.y = v']... --topology T [--hbm GiB]
[--platform gpu|cpu] [--json] [--cost [--chip KIND] [--steps N]]
[--model ARCH [--dtype D] [--queries N] [--query-tokens N]]

Compiles, ahead of time and from abstract shapes only (no data files, no weights), every program that
`python -m rrjax.train` with the same gin would run, for the devices of topology T, and reports per-device
memory: argument, output, temporary and aliased bytes, total = args + outputs + temps - aliased, what else is
resident meanwhile, the peak, and the budget. The programs come from the trainer itself
(`Trainer.programs()`), so what is compiled is what runs: SFT's train step; GRPO's rollout prefill and
decode (through `rrjax.decode.programs`), the no-gradient log-prob pass and the update, at the recipe's
largest shapes (prompts of GRPOConfig.max_prompt_tokens).

  T = a Cloud TPU topology (`v5e:2x2`, `v5p:2x2x1`, `v6e:2x4`, ...): the real TPU compiler (libtpu, the
      `rrjax[tpu]` extra) through jax.experimental.topologies; no TPU needed. HBM from the device kind.
  T = cpu:N: N simulated CPU devices, the proxy for an N-GPU mesh. --hbm GiB sets the budget (default 80).
      Platform settings (compute dtype, attention kernel, cache dtype) are the GPU's by default
      (--platform gpu); cuDNN attention, which cannot compile on CPU, is built as rrjax's chunked attention,
      whose scratch bounds the fused kernel's. --platform cpu models CPU devices (what a CPU run compiles).
      XLA:CPU is run with --xla_cpu_experimental_ynn_fusion_type= (empty), so fused kernels count their scratch.

With --model ARCH (a preset such as qwen2_5_7b, an HF config.json or directory, an rrjax run) the gin files
are a rerank's (RerankSettings, e.g. configs/rerank/reasonrank_7b_v5e.gin) and what is compiled is the
engine a rerank runs (rrjax.rerank.preflight): its prefill, insert and decode (Rank1 also its scoring pass)
with the slots, prefill group and chunk planned for the budget as at run time, on the mesh of one host's
devices (RerankSettings.mesh, else the size-based default), for --queries windows in flight and a longest
window of `window` passages of max_passage_tokens and a --query-tokens query. When not even one slot fits
beside the weights it exits 1 without compiling.

Settings that depend on the platform follow the target, never the host that compiles. `--json` prints one
JSON object as the last stdout line: {"topology", "device_kind", "platform", "devices", "mesh", "hbm_bytes",
"programs": [{"name", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes",
"resident_bytes"}], "peak_bytes", "fits", "warnings"}; with --cost each program also has "cost" (rrjax.cost:
"flops", "hbm_bytes", "useful_flops", "useful_hbm_bytes", "flops_ratio", "hbm_bytes_ratio", "remat_flops",
"roofline_seconds", "calls", "counted", per device) and the report "chip" and, for training, "step_seconds",
"tokens_per_second", "mfu_ceiling", "run_steps", "run_hours", "chip_hours", for a rerank "window_seconds",
"queries_per_second". Exit 0 when it fits, 1 when it does not (one line on
stderr: which program, how much, over what budget), 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

GiB = 2**30
_TPU_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")
# accelerator type per TPU generation, and TensorCores per chip in its name (v5p-8 is 4 chips)
_ACCELERATOR = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v5litepod": ("v5litepod", 1),
                "v6e": ("v6e", 1)}


def parse_topology(name: str) -> tuple[str, int | str]:
  """("cpu", N) for cpu:N, ("tpu", name) for a Cloud TPU topology name; ValueError otherwise."""
  m = re.fullmatch(r"cpu:(\d+)", name)
  if m:
    n = int(m.group(1))
    if n < 1:
      raise ValueError(f"--topology {name}: needs at least one device")
    return "cpu", n
  if _TPU_NAME.match(name):
    return "tpu", name
  raise ValueError(f"--topology {name!r}: expected cpu:N or a Cloud TPU topology such as v5e:2x2, v5p:2x2x1, v6e:2x4")


def _quiet_libtpu(name: str) -> None:
  """libtpu looks for the TPU VM it runs on and warns when it finds none; on a machine without TPUs, tell it
  one (these only describe the host; the compile target is the topology)."""
  from jax._src import hardware_utils
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return
  gen, dims = _TPU_NAME.match(name).groups()
  kind, cores = _ACCELERATOR.get(gen, (gen, 1))
  chips = 1
  for d in dims.split("x"):
    chips *= int(d)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{chips * cores}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # No chip to guard: compile-only processes may load libtpu side by side (its lockfile would refuse).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# Generations whose slices of up to 8 chips are one host (v5litepod-8, v6e-8 VMs: ct5lp-/ct6e-hightpu-8t);
# libtpu's default groups chips 4 to a host. Larger slices, and v4/v5p, have 4 chips per host.
_EIGHT_CHIP_HOSTS = ("v5e", "v5litepod", "v6e")


def tpu_devices(name: str) -> list:
  _quiet_libtpu(name)
  from jax.experimental import topologies
  gen, dims = _TPU_NAME.match(name).groups()
  bounds = [int(d) for d in dims.split("x")]
  kwargs = {}
  if gen in _EIGHT_CHIP_HOSTS and 4 < math.prod(bounds) <= 8:
    kwargs["chips_per_host_bounds"] = (bounds + [1, 1])[:3]
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
  except Exception as e:  # libtpu missing, or a name it does not know
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"--topology {name}: {first} (TPU topologies need libtpu: pip install 'rrjax[tpu]')") from None
  return list(topo.devices)


def _cpu_flags(n: int) -> None:
  """N host devices and XLA:CPU's fused-kernel scratch made visible; before the CPU backend starts."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count", "--xla_cpu_experimental_ynn_fusion_type"))]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}",
                                              "--xla_cpu_experimental_ynn_fusion_type="])


def architecture(config):
  """The model a run would build: init_from's architecture where it is here (config.json or an rrjax run),
  else TrainConfig.model (the recipes include the same preset); both with the run's policy."""
  from rrjax.train import loop
  if config.init_from and Path(config.init_from).exists():
    return loop.model_config(config), f"architecture of {config.init_from}"
  return config.model, "architecture of TrainConfig.model" + (
      f" ({config.init_from} is not here)" if config.init_from else "")


def tokenizer_of(config, model_type: str = "qwen2"):
  from rrjax import tokenizer as tokenizer_lib
  for path in (config.tokenizer, config.init_from):
    if path and Path(path).exists():
      return tokenizer_lib.load(path, model_type=model_type)
  return tokenizer_lib.load(model_type=model_type)


def _target(topology: str, platform: str | None) -> str:
  kind, _ = parse_topology(topology)
  platform = "tpu" if kind == "tpu" else (platform or "gpu")
  if platform not in ("cpu", "gpu", "tpu") or (kind == "tpu" and platform != "tpu"):
    raise ValueError(f"--platform {platform}: expected gpu or cpu with a cpu:N topology")
  return platform


@contextlib.contextmanager
def _compiling_for(platform: str):
  """Platform settings follow the target; cuDNN attention, which cannot compile on CPU, is built as chunked."""
  from rrjax import hardware
  from rrjax.model import attention as attention_lib

  stand_in = attention_lib.gpu_kernel_stand_in() if platform == "gpu" else contextlib.nullcontext()
  with hardware.target_platform(platform), stand_in:
    yield


def _devices_and_budget(topology: str, hbm_gib: float | None, devices=None) -> tuple[list, int]:
  """The topology's devices (or `devices`) and the per-device budget in bytes."""
  import jax

  from rrjax import hardware

  kind, size = parse_topology(topology)
  if devices is None:
    if kind == "tpu":
      devices = tpu_devices(size)
    else:
      devices = jax.devices("cpu")
      if len(devices) < size:
        raise ValueError(f"--topology {topology}: this process has {len(devices)} CPU devices (XLA_FLAGS is set "
                         "before JAX starts; run python -m rrjax.preflight)")
      devices = devices[:size]
  if kind == "tpu":
    return list(devices), int(hbm_gib * GiB) if hbm_gib else hardware.device_memory_bytes(devices[0])
  return list(devices), int((hbm_gib or 80) * GiB)


def run(gin_files, gin_params, topology: str, *, hbm_gib: float | None = None, platform: str | None = None,
        devices=None, cost: bool = False, chip: str | None = None, steps: int | None = None) -> tuple[dict, str]:
  """Compiles the recipe's programs for `topology` and returns (report, where the architecture came from).
  `devices` overrides the topology's devices (tests pass the host's CPU devices). With `cost`, each program's
  compiled and useful work (rrjax.cost) and the step's roofline on `chip` (default: the topology's) for a
  run of `steps` steps (default TrainConfig.num_steps)."""
  from rrjax import aot
  from rrjax import sharding as sharding_lib
  from rrjax.train import __main__ as entry
  from rrjax.train import loop
  from rrjax.train import state as state_lib

  platform = _target(topology, platform)
  with _compiling_for(platform):
    config = entry.parse_config(gin_files, gin_params)
    devices, hbm = _devices_and_budget(topology, hbm_gib, devices)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    model_cfg, source = architecture(config)
    trainer = entry.trainers()[config.trainer](config, mesh, model_cfg, tokenizer_of(config, model_cfg.model_type),
                                               compile_only=True)
    lay = state_lib.layout(loop.model_constructor(config, model_cfg), trainer.tx, mesh)
    trainer.bind(lay)
    rep = aot.measure(trainer, mesh, topology=topology, platform=platform, hbm_bytes=hbm, cost=cost,
                      chip=_chip(chip, devices) if cost else None, steps=steps)
  return rep, source


def _chip(kind: str | None, devices):
  """The roofline's chip: `kind` from rrjax.cost.CHIPS, else the devices' own kind (none for CPU devices)."""
  from rrjax import cost
  return cost.chip(kind) if kind else cost.chip_for_device_kind(devices[0].device_kind)


def run_rerank(gin_files, gin_params, topology: str, model: str, *, hbm_gib: float | None = None,
               platform: str | None = None, dtype: str | None = None, num_queries: int = 100,
               query_tokens: int | None = None, devices=None, cost: bool = False,
               chip: str | None = None) -> tuple[dict, str]:
  """Compiles the engine programs of a rerank (RerankSettings from the gin, architecture `model`: a preset,
  an HF config.json or directory, an rrjax run) for one host of `topology`: each host reranks its share of
  the queries with the model on its own devices, so the mesh spans the first host's devices. With `cost`, each
  program's compiled and useful work and the rerank's roofline on `chip` (default: the topology's)."""
  from rrjax import aot, hardware
  from rrjax import tokenizer as tokenizer_lib
  from rrjax.rerank import cli as rerank_cli
  from rrjax.rerank import preflight as rerank_preflight

  platform = _target(topology, platform)
  with _compiling_for(platform):
    settings = rerank_cli.settings_from_gin(gin_files, gin_params)
    devices, hbm = _devices_and_budget(topology, hbm_gib, devices)
    host = [d for d in devices if d.process_index == devices[0].process_index]
    arch, source = rerank_preflight.architecture(model)
    dtype = dtype or hardware.default_dtype()
    arch = arch.replace(dtype=dtype, param_dtype=dtype)
    mesh = rerank_cli.mesh_for(arch, settings.mesh, dtype, host, memory_limit_bytes=hbm)
    # A checkpoint's own tokenizer where it has one (tokenizer.load falls back to the bundled one).
    tokenizer = tokenizer_lib.load(Path(model).parent if Path(model).name == "config.json" else model,
                                   model_type=arch.model_type)
    programs, engine = rerank_preflight.programs(
        rerank_preflight.abstract_model(arch), settings, tokenizer, mesh, hbm_bytes=hbm, num_queries=num_queries,
        query_tokens=query_tokens or rerank_preflight.QUERY_TOKENS)
    if cost:
      programs, windows = _rerank_work(programs, settings, engine, arch, num_queries)
    rep, _ = aot.measure_programs(programs, mesh, topology=topology, platform=platform, hbm_bytes=hbm, cost=cost,
                                  chip=_chip(chip, devices) if cost else None)
  rep["rerank"] = {"mode": settings.mode, "schedule": settings.schedule, "dtype": dtype, "queries": num_queries,
                   "hosts": len({d.process_index for d in devices}), **engine}
  if cost:
    from rrjax import cost as cost_lib
    rep["rerank"]["windows"] = windows
    rep.update(cost_lib.rerank_totals(rep, windows=windows, queries=num_queries))
  return rep, source


def _rerank_work(programs, settings, engine: dict, arch, num_queries: int):
  """(programs with their rrjax.cost.Work, windows) of reranking `num_queries` queries: every window (a Rank1
  prompt) prefilled once in groups of the prefill program's size and decoded for max_new_tokens steps in the
  decode program's slots (the longest outputs: an upper bound on the steps); a decode step attends to the
  window's prompt and half its output (the mean over its steps)."""
  import dataclasses

  from rrjax import cost
  from rrjax.ranking.window import sliding_windows

  s = settings
  if s.mode == "pointwise":
    windows = num_queries * s.top_k
  elif s.mode == "full":
    windows = num_queries
  else:
    windows = num_queries * len(sliding_windows(s.top_k, s.window, s.stride))
  out = []
  for p in programs:
    prefix = "score_" if p.name.startswith("score_") else ""
    slots, group = engine[prefix + "slots"], engine[prefix + "prefill_group"]
    new = 1 if prefix else s.max_new_tokens
    prompt = engine["prompt_tokens"] + (s.max_new_tokens + 8 if prefix else 0)
    calls = {"prefill": -(-windows // group), "insert": -(-windows // group),
             "decode": -(-windows // slots) * new}[p.name[len(prefix):]]
    work = cost.engine_work(p.name, p.args, arch, context=prompt + new // 2, new_tokens=new, calls=calls)
    out.append(dataclasses.replace(p, work=work))
  return out, windows


def table(rep: dict) -> str:
  unit, name = (GiB, "GiB") if rep["peak_bytes"] >= GiB / 4 else (2**20, "MiB")
  head = (f"{'program':<18}{'args':>9}{'out':>9}{'temp':>9}{'aliased':>9}{'total':>9}{'resident':>10}"
          f"   ({name} per device)")
  lines = [head]
  for p in rep["programs"]:
    cells = [p[k] / unit for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes",
                                     "resident_bytes")]
    line = f"{p['name']:<18}" + "".join(f"{c:>9.2f}" for c in cells[:5]) + f"{cells[5]:>10.2f}"
    if "error" in p:
      line += f"   REFUSED: {p['error']}"
    lines.append(line)
  budget = "none" if rep["hbm_bytes"] is None else f"{rep['hbm_bytes'] / GiB:.2f} GiB"
  lines.append(f"peak {rep['peak_bytes'] / GiB:.2f} GiB per device, budget {budget}: "
               f"{'fits' if rep['fits'] else 'DOES NOT FIT'}")
  return "\n".join(lines)


def engine_line(r: dict) -> str:
  """The rerank engine's shape in one line."""
  if r["mode"] == "pointwise":
    return (f"rank1 engine: {r['prompts_per_call']} prompts per call of up to {r['prompt_tokens']} tokens; "
            f"{r['slots']} slots x {r['slot_length']} positions, prefill groups of {r['prefill_group']}; scoring "
            f"pass {r['score_slots']} slots x {r['score_slot_length']}")
  chunk = f" in chunks of {r['prefill_chunk']}" if r.get("prefill_chunk") else ""
  return (f"{r['mode']} engine ({r['schedule']}, {r['dtype']}): longest window {r['prompt_tokens']} prompt tokens; "
          f"{r['slots']} slots x {r['slot_length']} positions, prefill groups of {r['prefill_group']} x "
          f"{r['prefill_prompt']}{chunk}; planned {r['estimate_bytes'] / GiB:.2f} GiB per device")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m rrjax.preflight", description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
  p.add_argument("--topology", required=True, help="cpu:N or a Cloud TPU topology (v5e:2x2, v5p:2x2x1, ...)")
  p.add_argument("--hbm", type=float, default=None, help="per-device budget in GiB (cpu:N default 80)")
  p.add_argument("--platform", choices=("gpu", "cpu"), default=None, help="what cpu:N models (default gpu)")
  p.add_argument("--json", action="store_true", help="print the report as one JSON line last")
  p.add_argument("--cost", action="store_true", help="also count each program's FLOPs and HBM bytes against the "
                 "useful work, and a roofline time (rrjax.cost)")
  p.add_argument("--chip", default=None, help="the chip kind of the roofline: v4, v5e, v5p, v6e, A100, H100, H200 "
                 "(default: the topology's; cpu:N has none)")
  p.add_argument("--steps", type=int, default=None, help="training steps of the run for --cost's hours (default "
                 "TrainConfig.num_steps)")
  rr = p.add_argument_group("reranking (RerankSettings gin, e.g. configs/rerank/reasonrank_7b_v5e.gin)")
  rr.add_argument("--model", help="the architecture to rerank with: a preset (qwen2_5_7b), an HF config.json or "
                  "directory, or an rrjax run; selects the rerank preflight")
  rr.add_argument("--dtype", help="weights and compute dtype (default: the target's, bfloat16 on accelerators)")
  rr.add_argument("--queries", type=int, default=100, help="queries reranked together: the windows in flight "
                  "(default 100)")
  rr.add_argument("--query-tokens", type=int, default=None, help="tokens of the longest query (default 512)")
  args = p.parse_args(argv)
  if not args.gin_file and not args.gin_param and not args.model:
    p.error("give at least one --gin_file (or --model ARCH for a rerank with upstream's settings)")
  kind, size = parse_topology(args.topology)
  if args.chip:
    from rrjax import cost
    cost.chip(args.chip)  # an unknown kind fails before anything compiles
  if kind == "cpu":
    _cpu_flags(size)
  if args.model:
    from rrjax.engine.memory import DecodeMemoryError
    try:
      rep, source = run_rerank(args.gin_file, args.gin_param, args.topology, args.model, hbm_gib=args.hbm,
                               platform=args.platform, dtype=args.dtype, num_queries=args.queries,
                               query_tokens=args.query_tokens, cost=args.cost, chip=args.chip)
    except DecodeMemoryError as e:  # not even one slot fits beside the weights: nothing to compile
      if args.json:
        print(json.dumps({"topology": args.topology, "fits": False, "error": str(e)}))
      print(f"rrjax.preflight: does not fit: {e}", file=sys.stderr)
      return 1
  else:
    rep, source = run(args.gin_file, args.gin_param, args.topology, hbm_gib=args.hbm, platform=args.platform,
                      cost=args.cost, chip=args.chip, steps=args.steps)
  mesh = " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())
  print(f"rrjax.preflight: {', '.join(args.gin_file) or '--gin_param'} on {args.topology}: {rep['devices']} x "
        f"{rep['device_kind']} ({rep['platform']} settings), mesh {mesh}; {source}")
  if "rerank" in rep:
    print(engine_line(rep["rerank"]))
  print(table(rep))
  if args.cost:
    from rrjax import cost
    print(cost.table(rep))
  for warning in rep["warnings"]:
    print(f"rrjax.preflight: warning: {warning}", file=sys.stderr)
  if args.json:
    print(json.dumps(rep))
  sys.stdout.flush()
  if not rep["fits"]:
    from rrjax import aot
    print(f"rrjax.preflight: does not fit: {aot.failure(rep)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from rrjax import cli
  cli.run(main, prog="rrjax.preflight")
