"""`python -m rrjax.demo`: the ReasonRank recipe end to end on the embedded synthetic task, on a laptop CPU.

  1. synthesize: the programmatic teacher labels the task (pointwise positives, a listwise reasoning chain
     and ranking per query, the self-consistency filter) into upstream's formats (OUT/data);
  2. a small BPE tokenizer in Qwen2.5's layout, trained on the SFT text (OUT/tokenizer), so that a tiny
     model's output layer is not 152k wide;
  3. SFT of a small Qwen2-architecture model from random weights (OUT/sft);
  4. GRPO from the SFT weights with ReasonRank's multi-view reward (OUT/grpo);
  5. sliding-window reranking of the held-out queries with `python -m rrjax.rerank` after SFT and after
     SFT+GRPO, and nDCG@10 of the first stage, SFT and SFT+GRPO (OUT/rerank, OUT/summary.json);
  6. the final model as a Hugging Face checkpoint (OUT/grpo/hf), reloaded by transformers when installed
     to show that the logits agree;
  7. PNG plots of the SFT loss, the GRPO reward and the three nDCG@10 values (OUT/demo.png).

Settings live in configs/demo.gin (`--gin_file`, `--gin_param`). Running again with the same --out
resumes: finished stages are reused, so a different config needs a different --out. A tiny model trained
for minutes proves the machinery, not ReasonRank's quality: that needs Qwen2.5 weights and accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

import gin

from rrjax import cli, fileio, gin_config
from rrjax.rerank import cli as rerank_cli  # noqa: F401  registers RerankSettings with gin
from rrjax.synth.task import TaskConfig
from rrjax.train import __main__ as train_entry
from rrjax.train.config import TrainConfig

DEFAULT_GIN = "demo.gin"  # configs/demo.gin, installed with the package
STAGES = (("first_stage", "first stage (BM25, bm25s)"), ("sft", "after SFT"), ("grpo", "after SFT + GRPO"))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  task: TaskConfig = TaskConfig()
  tokenizer_vocab: int = 1024
  sft: TrainConfig = TrainConfig(trainer="sft")
  grpo: TrainConfig = TrainConfig(trainer="grpo")
  rerank: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # RerankSettings fields
  alpha: float = 0.4  # the self-consistency filter's NDCG@10 threshold


gin.external_configurable(TaskConfig, module="rrjax.synth")
_GIN_DEMO = gin.external_configurable(DemoConfig, module="rrjax.demo")


def parse_config(gin_files, gin_params) -> tuple[DemoConfig, str]:
  """The DemoConfig from gin, and gin's text of it (kept in OUT to refuse resuming a different config)."""
  config = gin_config.parse(gin_files, gin_params, _GIN_DEMO)
  for name in ("sft", "grpo"):
    if getattr(config, name).trainer != name:
      raise ValueError(f"gin: DemoConfig.{name} must have trainer {name!r}")
  return config, gin.config_str()


# ---------------------------------------------------------------- stages


def synthesize(config: DemoConfig, out: Path) -> dict:
  from rrjax import tokenizer as tokenizer_lib
  from rrjax.synth import task as task_lib
  from rrjax.synth.inputs import synthesize_task
  from rrjax.synth.pipeline import SynthConfig
  from rrjax.synth.teachers import ProgrammaticTeacher

  task = task_lib.generate(config.task)
  return synthesize_task(task, out, ProgrammaticTeacher(), tokenizer_lib.load(), SynthConfig(alpha=config.alpha))


def small_tokenizer(sft_json: Path, out: Path, vocab_size: int):
  """Trains the demo's tokenizer once; a resumed demo must keep the one its checkpoints were trained with."""
  from rrjax import tokenizer as tokenizer_lib
  if (out / "tokenizer.json").exists():
    return tokenizer_lib.load(out)
  rows = json.loads(sft_json.read_text())
  texts = [f"{r['system']}\n{r['instruction']}\n{r['output']}" for r in rows]
  with fileio.atomic_dir(out) as tmp:
    tokenizer_lib.train_small(texts, tmp, vocab_size=vocab_size)
  return tokenizer_lib.load(out)


def _export(run_dir: Path) -> Path:
  return run_dir / "hf" / "config.json"  # the training loop's last act: the run finished when it exists


def _newer(path: Path, than: Path) -> bool:
  return path.exists() and than.exists() and path.stat().st_mtime_ns >= than.stat().st_mtime_ns


def train(config: TrainConfig, operative: str) -> bool:
  """Trains (or resumes) one stage; False when it had finished before (its export is reused as it is)."""
  from rrjax.train import loop
  if _export(Path(config.run_dir)).exists():
    return False
  loop.run(config, train_entry.trainers()[config.trainer], operative_config=operative)
  return True


def rerank_heldout(model_dir: Path, data: Path, settings: Mapping[str, Any], out: Path) -> tuple[dict, bool]:
  """`python -m rrjax.rerank` over the held-out split: (its report's metrics, whether it ran). A report from
  the same settings and model, newer than the model's export, is reused."""
  from rrjax import rerank
  from rrjax.rerank import report as report_lib
  test = data / "test"
  argv = ["--model", str(model_dir), "--run", str(test / "run.lexical.txt"), "--queries", str(test / "topics.tsv"),
          "--corpus", str(test / "corpus.jsonl"), "--qrels", str(test / "qrels.txt"), "--out", str(out),
          "--no-progress"]
  for name, value in settings.items():
    argv += ["--gin_param", f"RerankSettings.{name} = {value!r}"]
  report_file = rerank.report_path(out)
  if _newer(report_file, _export(model_dir)):
    resolved = rerank.resolve_settings(rerank.build_parser().parse_args(argv))
    report = report_lib.finished_report(report_file, dataclasses.asdict(resolved), str(model_dir))
    if report is not None and "metrics" in report:
      return report["metrics"], False
  rerank.main(argv)
  return json.loads(report_file.read_text())["metrics"], True


# Logits agree when |ours - theirs| <= ATOL + RTOL * |theirs| everywhere (numpy's allclose): float32 rounding grows
# with the logits' size, and a GRPO run with larger steps has printed 1.3e-4 at its largest logits.
ATOL, RTOL = 1e-4, 1e-5


def compare_with_transformers(hf_dir: Path, prompt_ids: list[int]) -> dict[str, float | bool]:
  """Largest logit difference between rrjax's and transformers' loads of the export (fp32), and whether
  they agree within ATOL + RTOL * |transformers' logit|."""
  import jax.numpy as jnp
  import numpy as np

  from rrjax.checkpoints import from_pretrained
  ours = np.asarray(from_pretrained(hf_dir, dtype="float32")(jnp.asarray([prompt_ids])))
  try:
    import torch
    import transformers
  except ImportError:
    return {}
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  with torch.no_grad():
    theirs = ref(torch.tensor([prompt_ids])).logits.numpy()
  return {"transformers_max_abs_logit_diff": float(np.abs(theirs - ours).max()),
          "transformers_logits_agree": bool(np.allclose(ours, theirs, rtol=RTOL, atol=ATOL))}


def plot(out: Path, sft_dir: Path, grpo_dir: Path, ndcg: Mapping[str, float]) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from rrjax.train.logger import read_metrics, save_png

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for ax, run_dir, key, title in ((axes[0], sft_dir, "loss", "SFT loss (response tokens)"),
                                  (axes[1], grpo_dir, "reward_mean", "GRPO reward (rollout mean)")):
    records = [r for r in read_metrics(run_dir) if key in r]
    ax.plot([r["step"] for r in records], [r[key] for r in records])
    ax.set_title(title)
    ax.set_xlabel("step")
  axes[0].set_yscale("log")
  labels = [label.split(" (")[0] for _, label in STAGES]
  values = [ndcg[name] for name, _ in STAGES]
  bars = axes[2].bar(labels, values, color=["#999999", "#4c72b0", "#dd8452"])
  axes[2].bar_label(bars, fmt="%.3f")
  axes[2].set_ylim(0, 1)
  axes[2].set_title("held-out nDCG@10")
  fig.tight_layout()
  return save_png(fig, out / "demo.png", dpi=90)


def _finished_summary(out: Path, grpo_dir: Path, ndcg: Mapping[str, float]) -> dict | None:
  """The previous run's summary when it describes this export (written after it, same nDCG) and its plot exists."""
  path = out / "summary.json"
  if not _newer(path, _export(grpo_dir)):
    return None
  summary = json.loads(path.read_text())
  if summary.get("heldout_ndcg10") != dict(ndcg) or not Path(summary.get("plots", "")).is_file():
    return None
  return summary


# ---------------------------------------------------------------- main


def run(config: DemoConfig, operative: str, out: Path) -> dict:
  from rrjax.data import rl as rl_data

  out.mkdir(parents=True, exist_ok=True)
  saved = out / "demo_config.gin"
  if saved.exists() and saved.read_text() != operative:
    raise ValueError(f"{saved}: {out} was made with a different configuration; use another --out or delete it")
  with fileio.atomic_open(saved) as f:
    f.write(operative)
  seconds: dict[str, float] = {}
  clock = [time.perf_counter()]

  def stage(name: str, message: str) -> None:
    now = time.perf_counter()
    seconds[name] = round(now - clock[0], 1)
    clock[0] = now
    print(f"rrjax.demo: {message} ({seconds[name]} s)", flush=True)

  data = out / "data"
  synth = synthesize(config, data)
  kept, total = synth["train"]["labelled"]["kept"], synth["train"]["labelled"]["queries"]
  stage("synthesize", f"synthesized {total} training queries ({kept} kept by the self-consistency filter) and "
        f"{synth['test']['labelled']['queries']} held-out queries into {data}")
  tok = small_tokenizer(data / "train" / "sft.json", out / "tokenizer", config.tokenizer_vocab)
  vocab = -(-len(tok) // 64) * 64
  stage("tokenizer", f"small BPE tokenizer: {len(tok)} tokens (model vocabulary {vocab})")

  sft_dir, grpo_dir = out / "sft", out / "grpo"
  sft = dataclasses.replace(
      config.sft, run_dir=str(sft_dir), tokenizer=str(out / "tokenizer"), init_from=None,
      model=dataclasses.replace(config.sft.model, vocab_size=vocab),
      sft_data=dataclasses.replace(config.sft.sft_data, train_files=(str(data / "train" / "sft.json"),)))
  reused = " (finished before: reused)"
  ran = train(sft, operative)
  stage("sft", f"SFT: {sft.num_steps} steps -> {sft_dir}{'' if ran else reused}")
  ndcg_sft, ran = rerank_heldout(sft_dir, data, config.rerank, out / "rerank" / "sft.trec")
  stage("rerank_sft", f"reranked the held-out queries after SFT{'' if ran else reused}")

  grpo = dataclasses.replace(
      config.grpo, run_dir=str(grpo_dir), init_from=str(sft_dir), tokenizer=None,
      rl_data=dataclasses.replace(config.grpo.rl_data, train_files=(str(data / "train" / "rl.jsonl"),)))
  ran = train(grpo, operative)
  stage("grpo", f"GRPO: {grpo.num_steps} steps -> {grpo_dir}{'' if ran else reused}")
  ndcg_grpo, ran = rerank_heldout(grpo_dir, data, config.rerank, out / "rerank" / "grpo.trec")
  stage("rerank_grpo", f"reranked the held-out queries after SFT + GRPO{'' if ran else reused}")

  ndcg = {"first_stage": ndcg_sft["first_stage"]["ndcg@10"], "sft": ndcg_sft["reranked"]["ndcg@10"],
          "grpo": ndcg_grpo["reranked"]["ndcg@10"]}
  previous = _finished_summary(out, grpo_dir, ndcg)
  if previous is not None:  # the same export, already compared with transformers and plotted
    parity = {k: previous[k] for k in ("transformers_max_abs_logit_diff", "transformers_logits_agree")
              if k in previous}
    png = Path(previous["plots"])
    stage("export_and_plots", f"exported {grpo_dir / 'hf'}, plots in {png}{reused}")
  else:
    first_heldout = next(rl_data.read_rl_jsonl(data / "test" / "rl.jsonl", tokenizer=tok))
    parity = compare_with_transformers(grpo_dir / "hf", tok.encode(first_heldout.prompt))
    png = plot(out, sft_dir, grpo_dir, ndcg)
    stage("export_and_plots", f"exported {grpo_dir / 'hf'}, plots in {png}")

  summary = {"heldout_ndcg10": ndcg, "gain_over_first_stage": ndcg["grpo"] - ndcg["first_stage"],
             "heldout_queries": ndcg_sft["num_queries"], "rerank": dict(config.rerank),
             "hf_checkpoint": str(grpo_dir / "hf"), "plots": str(png), **parity, "seconds": seconds,
             "total_seconds": round(sum(seconds.values()), 1)}
  with fileio.atomic_open(out / "summary.json") as f:
    json.dump(summary, f, indent=1)
  r = config.rerank
  print(f"\nheld-out nDCG@10 ({summary['heldout_queries']} queries; top {r.get('top_k')} reranked with windows of "
        f"{r.get('window')}, stride {r.get('stride')}):")
  for name, label in STAGES:
    print(f"  {label:<30} {ndcg[name]:.4f}")
  if parity:
    diff = parity["transformers_max_abs_logit_diff"]
    print(f"transformers reloads {grpo_dir / 'hf'}: largest logit difference {diff:.2e} "
          f"({'logits agree' if parity.get('transformers_logits_agree') else 'LOGITS DIFFER'})")
  print(f"total {summary['total_seconds']} s; summary in {out / 'summary.json'}")
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rrjax.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/demo", help="the demo's directory (rerunning resumes it)")
  parser.add_argument("--gin_file", action="append", default=None, help=f"gin file(s) (default {DEFAULT_GIN})")
  parser.add_argument("--gin_param", action="append", default=[], help="e.g. 'sft/TrainConfig.num_steps = 900'")
  args = parser.parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes on opening checkpoints read-only
  config, operative = parse_config(args.gin_file or [DEFAULT_GIN], args.gin_param)
  summary = run(config, operative, Path(args.out))
  return 0 if summary.get("transformers_logits_agree", True) else 1


def console() -> None:
  """The `rrjax-demo` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.demo")
