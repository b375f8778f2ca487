"""`python -m rrjax.rerank --model M --run R --queries Q --corpus C --out OUT.trec`: rerank a first-stage run.

Modes: `listwise` (ReasonRank: top-100, windows of 20, stride 10, back to front; `--schedule async` starts a
query's next window as soon as its last one ends, `lockstep` runs every query's k-th window together, the
same run under greedy decoding), `full` (one prompt over all top-k passages) and `pointwise` (Rank1), all
on the engine (rrjax.engine), with the model on a (data, fsdp, tensor) mesh of the local devices
(`--mesh D,F,T`; by default replicas when it fits one device, else tensor parallelism). Settings come from
upstream's defaults, then `--gin_file`/`--gin_param` (`RerankSettings.window = 20`, see configs/rerank/),
then flags. With a RankGPT json as --corpus, --run and --queries default to that file's. `--dataset
bright:TASK|beir|msmarco --data_dir D` reads a benchmark in its published layout (rrjax.data.benchmarks:
BRIGHT with ReasonRank's bundled first-stage runs); explicit file flags override it. Every input is
read and checked before the model loads; bad input is one stderr line naming the file, line and id, exit 2,
and nothing written. The run (OUT.trec) and a report (OUT.json: settings, per-query windows, tokens, parser
fallbacks, throughput, metrics against --qrels) are written atomically at the end.

Several hosts: each reranks every `process_count`-th query with its own model on its local devices,
the rankings meet through a collective (no shared filesystem needed), and process 0 writes one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import gin

from rrjax import distributed, gin_config
from rrjax.data import benchmarks
from rrjax.ranking import rerank_loop as loop
from rrjax.ranking.prompt import PROMPT_MODES, UPSTREAM_MODES
from rrjax.rerank import report as report_lib
from rrjax.rerank.runner import rerank
from rrjax.rerank.settings import FIELDS, RerankSettings
from rrjax.sharding import MeshConfig


def _settings_fields(**kwargs):
  return kwargs


# gin collects the bindings as keyword arguments, so an unknown field gets our message, not gin's.
_GIN_SETTINGS = gin.external_configurable(_settings_fields, name="RerankSettings")
# `RerankSettings.mesh = @MeshConfig()` (the training configs' MeshConfig; registering it again is a no-op).
gin.external_configurable(MeshConfig, module="rrjax")


def settings_from_gin(files: Sequence[str] = (), params: Sequence[str] = (),
                      base: RerankSettings = RerankSettings()) -> RerankSettings:
  """`base` with the `RerankSettings.field = value` bindings of gin files and parameters applied; names
  resolve as rrjax.gin_config describes, with configs/rerank/ first."""
  if not files and not params:
    return base
  kwargs = gin_config.parse(files, params, _GIN_SETTINGS, subdir="rerank")
  unknown = sorted(set(kwargs) - set(FIELDS))
  if unknown:
    bindings = [repr(" ".join(p.split())) for p in params
                if any(re.match(rf"\s*RerankSettings\.{name}\s*=", p) for name in unknown)]
    where = f"gin binding {', '.join(bindings)}" if bindings else f"gin ({', '.join(map(str, files))})"
    raise ValueError(f"{where}: unknown RerankSettings field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
  return dataclasses.replace(base, **kwargs)


def _positive(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {value}")
  return value


def _mesh(text: str) -> MeshConfig:
  try:
    sizes = [int(x) for x in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(f"expected D,F,T (data, fsdp, tensor; -1 = the rest), got {text!r}")
  return MeshConfig(*sizes)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m rrjax.rerank", description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="a Hugging Face Qwen2 directory or an rrjax checkpoint")
  distributed.add_flags(ap)
  ap.add_argument("--run", help="first-stage TREC run (default: the RankGPT --corpus's)")
  ap.add_argument("--queries", help="topics, tsv `qid<TAB>query` or jsonl (default: the RankGPT --corpus's)")
  ap.add_argument("--corpus", help="corpus: jsonl, tsv or parquet, or a RankGPT json [{query, hits}] (or --dataset)")
  ap.add_argument("--out", required=True, help="the reranked TREC run; the report goes next to it as .json")
  ap.add_argument("--qrels", help="TREC qrels: report NDCG@1/5/10 and Recall@k, ours and the first stage's")
  benchmarks.add_flags(ap)
  ap.add_argument("--gin_file", action="append", default=[], help="gin file(s) binding RerankSettings.*")
  ap.add_argument("--gin_param", action="append", default=[], help="e.g. 'RerankSettings.window = 20'")
  ap.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on accelerators)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  d = RerankSettings()  # the flags default to None (gin may set a field); --help shows what applies without gin
  flags = ap.add_argument_group("settings (override gin; defaults are upstream's, shown here; gin RerankSettings.*)")
  flags.add_argument("--mode", choices=loop.RERANK_MODES, help=f"default: {d.mode}")
  flags.add_argument("--top-k", type=_positive, help=f"candidates reranked per query (default: {d.top_k})")
  flags.add_argument("--window", type=_positive, help=f"passages per window (default: {d.window})")
  flags.add_argument("--stride", type=_positive, help=f"window step, back to front (default: {d.stride})")
  flags.add_argument("--max-passage-tokens", type=int, help=f"passages cut to this many tokens (default: "
                     f"{d.max_passage_tokens}; upstream uses 100 on BEIR and TREC DL)")
  flags.add_argument("--max-new-tokens", type=_positive, help=f"per window (default: {d.max_new_tokens} = 3072 of "
                     "reasoning + 100)")
  flags.add_argument("--min-new-tokens", type=int, help=f"default: {d.min_new_tokens}")
  flags.add_argument("--batch-size", type=_positive, help="decode slots (default: as many as memory holds)")
  flags.add_argument("--schedule", choices=loop.SCHEDULES, help="async (default): a query's next window starts "
                     "as soon as its last one ends; lockstep: every query's k-th window together")
  flags.add_argument("--mesh", type=_mesh, help="D,F,T: a (data, fsdp, tensor) mesh over this process's devices "
                     "(default: replicas when the model fits one device, else tensor parallelism)")
  flags.add_argument("--temperature", type=float, help=f"default: {d.temperature} (greedy)")
  flags.add_argument("--top-p", type=float, help=f"default: {d.top_p}")
  flags.add_argument("--sampling-top-k", type=int,
                     help=f"decoding's top-k (0: off; --top-k is the candidates; default: {d.sampling_top_k})")
  flags.add_argument("--min-p", type=float, help=f"decoding's min-p (0: off; default: {d.min_p})")
  flags.add_argument("--seed", type=int, help=f"default: {d.seed}")
  flags.add_argument("--prompt-mode", choices=PROMPT_MODES + tuple(UPSTREAM_MODES), help=f"default: {d.prompt_mode}")
  flags.add_argument("--max-queries", type=_positive, help="only the run's first N queries (default: all)")
  flags.add_argument("--tag", help=f"the run's tag column (default: {d.tag})")
  return ap


def resolve_settings(args: argparse.Namespace) -> RerankSettings:
  settings = settings_from_gin(args.gin_file, args.gin_param)
  flags = {f: getattr(args, f) for f in FIELDS if getattr(args, f, None) is not None}
  return dataclasses.replace(settings, **flags)


def _qid(query: Any) -> str:
  return str(query["qid"]) if isinstance(query, Mapping) else str(query.qid)


def share(queries: Sequence, process_index: int | None = None, process_count: int | None = None) -> list:
  """This process's queries: every `process_count`-th, starting at `process_index`."""
  import jax
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return list(queries[index::count])


def rerank_across_processes(queries: Sequence, rerank_queries: Callable[[list], Mapping[str, Any]]
                            ) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}} of every query, in input order and each in its reranked order, on every process.
  `rerank_queries(share)` returns {qid: [(docid, score), ...] or {docid: score}} for this process's share
  (possibly empty); the shares travel as JSON through a collective."""
  order = [_qid(q) for q in queries]
  if len(set(order)) != len(order):
    raise ValueError(f"query {next(q for q in order if order.count(q) > 1)!r} appears more than once")
  mine = share(queries)
  local = {str(q): list(dict(r).items()) for q, r in rerank_queries(mine).items()}
  if set(local) != {_qid(q) for q in mine}:
    raise ValueError(f"rerank_queries returned the wrong queries ({sorted(local)[:5]} for "
                     f"{[_qid(q) for q in mine][:5]})")
  merged = {}
  for blob in distributed.allgather_bytes(json.dumps(local).encode()):  # float repr round-trips exactly
    merged.update(json.loads(blob))
  if set(merged) != set(order):  # a process that lost queries would otherwise shorten the run silently
    raise ValueError(f"merged rankings cover {len(merged)} of {len(order)} queries")
  return {q: dict(merged[q]) for q in order}


def local_mesh(model_path, config: MeshConfig | None, dtype: str | None):
  """The (data, fsdp, tensor) mesh over this process's devices: `config`'s (its first D*F*T devices when it
  names sizes), or the default for the model's size (rrjax.engine.memory.inference_mesh)."""
  import jax

  from rrjax.checkpoints import load_config

  arch = load_config(model_path) if config is None else None
  return mesh_for(arch, config, dtype, jax.local_devices())


def mesh_for(arch, config: MeshConfig | None, dtype: str | None, devices, memory_limit_bytes: int | None = None):
  """`config`'s mesh over `devices` (its first D*F*T when it names sizes), or else the default for the
  architecture `arch` in `dtype` (rrjax.engine.memory.inference_mesh, for `memory_limit_bytes` per device)."""
  from rrjax import hardware, sharding
  from rrjax.engine import memory

  devices = list(devices)
  if config is None:
    config = memory.inference_mesh(arch, devices, dtype or hardware.default_dtype(), memory_limit_bytes)
  sizes = (config.data, config.fsdp, config.tensor)
  if -1 not in sizes:
    if math.prod(sizes) > len(devices):
      raise ValueError(f"--mesh {','.join(map(str, sizes))} needs {math.prod(sizes)} devices; this process has "
                       f"{len(devices)}")
    devices = devices[:math.prod(sizes)]
  return sharding.make_mesh(config, devices)


def load_model(args: argparse.Namespace, settings: RerankSettings):
  """(model, tokenizer, mesh): --model loaded straight onto this process's mesh."""
  from rrjax import tokenizer as tokenizer_lib
  from rrjax.checkpoints import from_pretrained

  mesh = local_mesh(args.model, settings.mesh, args.dtype)
  model = from_pretrained(args.model, dtype=args.dtype, mesh=mesh)
  return model, tokenizer_lib.load(args.model, model_type=model.config.model_type), mesh


def main(argv: Sequence[str] | None = None, *, loaded=None) -> int:
  """The CLI; `loaded` (what `load_model` returns), when given, is used instead of loading --model
  (rrjax.bright reranks every task with one model)."""
  args = build_parser().parse_args(argv)
  settings = resolve_settings(args)
  report_lib.report_path(args.out)  # a bad --out fails before any work
  dataset = benchmarks.from_args(args)
  inputs = dataset.load(top_k=settings.top_k, max_queries=settings.max_queries)
  qrels = dataset.read_qrels()
  if inputs.sources.get("run_lines_skipped"):
    print(f"rrjax.rerank: skipped {inputs.sources['run_lines_skipped']} run lines that are not 6 fields "
          f"(docids with spaces), as upstream does: {dataset.run}", file=sys.stderr)

  distributed.initialize_from_args(args)
  # One model per process on its local devices (loaded straight onto its mesh): with several hosts, each
  # reranks its share of the queries.
  model, tokenizer, mesh = loaded if loaded is not None else load_model(args, settings)
  outputs = []

  def rerank_share(queries):
    outputs.append(rerank(queries, model, tokenizer, settings, mesh=mesh, progress=not args.no_progress))
    return loop.to_run(outputs[-1].ranked)

  reranked = rerank_across_processes(inputs.queries, rerank_share)
  extra = {"model": str(args.model), "gin_files": list(args.gin_file), "gin_params": list(args.gin_param),
           "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes)))}
  sources = {**inputs.sources, "qrels": ", ".join(dataset.qrels) if dataset.qrels else None}
  own = report_lib.build_report(settings, outputs[0], sources=sources, extra=extra)
  report = report_lib.merge_reports(distributed.allgather_json(own))
  if qrels is not None:
    report["metrics"] = report_lib.evaluate_both(qrels, reranked, inputs.first_stage, settings.top_k)
  try:
    if distributed.is_primary():
      # Written in reranked order; the slot scores keep trec_eval's order equal to it unless the first stage tied.
      report_lib.write_outputs(args.out, reranked, report, tag=settings.tag)
  finally:
    distributed.barrier("rrjax_rerank_written")
  totals, metrics = report["totals"], report.get("metrics")
  line = (f"rrjax.rerank: {totals['queries']} queries, {totals['generated_tokens']} generated tokens in "
          f"{totals['wall_seconds']:.1f}s -> {args.out}")
  if metrics is not None:
    line += "; " + ", ".join(f"{k} {v:.4f} (first stage {metrics['first_stage'][k]:.4f})"
                             for k, v in metrics["reranked"].items())
  note = report_lib.fallback_note(totals)
  if note:
    line += f"; parser: {note} (per query in {report_lib.report_path(args.out)})"
  print(line, file=sys.stderr)
  return 0
