"""Compile a run's programs ahead of time and report their per-device memory (what `python -m rrjax.preflight`
prints for training and reranking, and `python -m rrjax.train` writes as preflight.json before its first step).

A trainer lists its programs (`Trainer.programs()`), a rerank its engine's (rrjax.rerank.preflight): each is the
jitted function the run calls and its arguments as ShapeDtypeStructs on their shardings, so what is compiled
here is what runs. Per device and per
program: argument, output, temporary and aliased (donated input reused as output) bytes from XLA's
`memory_analysis()`; total = arguments + outputs + temporaries - aliased. Arrays that stay resident while a
program runs without being its arguments (the optimizer state during a rollout, the reference weights during an
update) are added as `resident_bytes`; the peak is the largest total + resident over the programs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

import jax
import numpy as np

from rrjax import fileio
from rrjax import sharding as sharding_lib

GiB = 2**30
FILE = "preflight.json"


@dataclasses.dataclass(frozen=True)
class Program:
  """One program a run executes: the jitted function, its abstract arguments, and what else is resident."""

  name: str
  fn: Any  # jax.jit(...)
  args: tuple
  resident_bytes: int = 0
  attention: str | None = None  # the attention kernel its sequences resolve to on the target platform
  work: Any = None  # rrjax.cost.Work: what it computes, for --cost's useful work


@dataclasses.dataclass
class Measured:
  name: str
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  resident_bytes: int = 0
  error: str | None = None  # the compiler refused it (e.g. TPU CompileTimeHbmOom)
  compiled: Any = dataclasses.field(default=None, repr=False)
  cost: dict | None = None  # rrjax.cost.program_cost, with --cost

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  def to_json(self) -> dict:
    out = {"name": self.name, "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
           "temp_bytes": self.temp_bytes, "alias_bytes": self.alias_bytes, "total_bytes": self.total_bytes,
           "resident_bytes": self.resident_bytes}
    if self.error:
      out["error"] = self.error
    if self.cost is not None:
      out["cost"] = self.cost
    return out


def device_bytes(tree: Any) -> int:
  """Bytes per device of a tree of (abstract or concrete) arrays on their shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
    total += math.prod(shape) * x.dtype.itemsize
  return total


_REFUSED = re.compile(r"memory required for (.+?) \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_program(program: Program, mesh, compiler_options: dict | None = None) -> Measured:
  """Lowers and compiles one program (nothing runs, nothing is allocated) and measures it. A compiler that
  refuses for lack of memory gives a Measured with `error` set (and what it said it needed as temp_bytes)."""
  with jax.set_mesh(mesh):
    lowered = program.fn.lower(*program.args)
  try:
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED / CompileTimeHbmOom
    text = " ".join(str(e).split())
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
      raise
    m = _REFUSED.search(text)
    temp = int(float(m.group(2)) * _UNIT[m.group(3)]) if m else 0
    return Measured(program.name, temp_bytes=temp, resident_bytes=program.resident_bytes,
                    error=(m.group(0) if m else text[:300]))
  stats = compiled.memory_analysis()
  return Measured(program.name, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                  int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes), program.resident_bytes,
                  compiled=compiled)


def attention_warnings(programs: Sequence[Program], platform: str) -> list[str]:
  """Programs that attend with the unfused XLA kernel on an accelerator (T x T scores in memory)."""
  if platform not in ("tpu", "gpu"):
    return []
  return [f"{p.name} attends with attention='xla' on {platform} (the fused kernel would be "
          f"{'splash' if platform == 'tpu' else 'cudnn'}; check the sequence length and dtype)"
          for p in programs if p.attention == "xla"]


def report(measured: Sequence[Measured], *, topology: str, devices, mesh, hbm_bytes: int | None,
           platform: str, warnings: Sequence[str] = ()) -> dict:
  """The preflight JSON (see rrjax/preflight.py)."""
  peak = max((m.total_bytes + m.resident_bytes for m in measured), default=0)
  refused = any(m.error for m in measured)
  fits = (not refused) and (hbm_bytes is None or peak <= hbm_bytes)
  return {"topology": topology, "device_kind": devices[0].device_kind, "platform": platform,
          "devices": len(devices), "mesh": sharding_lib.mesh_sizes(mesh),
          "hbm_bytes": hbm_bytes, "programs": [m.to_json() for m in measured], "peak_bytes": peak, "fits": fits,
          "warnings": list(warnings)}


def _gib(n) -> str:
  return f"{n / GiB:.3g}"


def summary(rep: dict) -> str:
  """One line: per program total (args + outputs + temps - aliased) and the peak against the budget."""
  parts = []
  for p in rep["programs"]:
    if "error" in p:
      parts.append(f"{p['name']} refused by the compiler")
      continue
    extra = f" +{_gib(p['resident_bytes'])} resident" if p["resident_bytes"] else ""
    parts.append(f"{p['name']} {_gib(p['argument_bytes'])} args + {_gib(p['output_bytes'])} out + "
                 f"{_gib(p['temp_bytes'])} temp - {_gib(p['alias_bytes'])} aliased = {_gib(p['total_bytes'])}{extra}")
  budget = "no budget" if rep["hbm_bytes"] is None else f"{_gib(rep['hbm_bytes'])} GiB"
  verdict = "fits" if rep["fits"] else "DOES NOT FIT"
  return (f"per device (GiB): {'; '.join(parts)}; peak {_gib(rep['peak_bytes'])} of {budget} on "
          f"{rep['devices']} x {rep['device_kind']}: {verdict}")


def failure(rep: dict) -> str | None:
  """The one-line reason a report does not fit (None when it fits)."""
  if rep["fits"]:
    return None
  for p in rep["programs"]:
    if "error" in p:
      return f"{p['name']}: the compiler refused it: {p['error']}"
  worst = max(rep["programs"], key=lambda p: p["total_bytes"] + p["resident_bytes"])
  need = worst["total_bytes"] + worst["resident_bytes"]
  return (f"{worst['name']} needs {_gib(need)} GiB per device ({_gib(worst['argument_bytes'])} args + "
          f"{_gib(worst['output_bytes'])} out + {_gib(worst['temp_bytes'])} temp - {_gib(worst['alias_bytes'])} "
          f"aliased + {_gib(worst['resident_bytes'])} resident), over the {_gib(rep['hbm_bytes'])} GiB of "
          f"{rep['device_kind']}")


def write(rep: dict, path) -> None:
  fileio.write_text(path, json.dumps(rep, indent=2) + "\n")


def measure(trainer, mesh, *, topology: str, platform: str, hbm_bytes: int | None,
            compiler_options: dict | None = None, adopt: bool = False, chip=None, cost: bool = False,
            steps: int | None = None) -> dict:
  """Compiles every program of `trainer` (bound to its layout) and returns the report. With `adopt`, the
  trainer keeps the executables it can reuse (the run then compiles nothing twice). With `cost`, each program's
  rrjax.cost entry and the step's roofline on `chip` (a rrjax.cost.Chip; None: no roofline) for a run of
  `steps` steps (None: TrainConfig.num_steps)."""
  programs = trainer.programs(hbm_bytes)
  rep, measured = measure_programs(programs, mesh, topology=topology, platform=platform, hbm_bytes=hbm_bytes,
                                   compiler_options=compiler_options, chip=chip, cost=cost)
  if cost:
    from rrjax import cost as cost_lib
    rep.update(cost_lib.training_totals(rep, tokens_per_step=trainer.tokens_per_step(), chip=chip,
                                        steps=steps or trainer.config.num_steps or None))
  if adopt:
    for p, m in zip(programs, measured):
      if m.compiled is not None:
        trainer.adopt(p, m.compiled)
  return rep


def measure_programs(programs: Sequence[Program], mesh, *, topology: str, platform: str, hbm_bytes: int | None,
                     compiler_options: dict | None = None, warnings: Sequence[str] = (), chip=None,
                     cost: bool = False) -> tuple[dict, list]:
  """(report, [Measured]) of compiling `programs` on `mesh`; with `cost`, each program's rrjax.cost entry
  (roofline on `chip` where one is given) and the report's "chip"."""
  measured = [compile_program(p, mesh, compiler_options) for p in programs]
  devices = list(np.asarray(mesh.devices).flat)
  if cost:
    from rrjax import cost as cost_lib
    for p, m in zip(programs, measured):
      if m.compiled is not None:
        m.cost = cost_lib.program_cost(m.compiled.as_text(), p.work, chip, len(devices),
                                       sharding_lib.mesh_sizes(mesh).get("tensor", 1))
  rep = report(measured, topology=topology, devices=devices, mesh=mesh, hbm_bytes=hbm_bytes, platform=platform,
               warnings=[*attention_warnings(programs, platform), *warnings])
  if cost:
    rep["chip"] = chip.to_json() if chip is not None else None
  return rep, measured
