"""Multi-host: two real JAX processes (4 CPU devices each, jax.distributed over 127.0.0.1) against one
process of 8 devices. SFT gives the same losses and parameters, a 2-process checkpoint resumes exactly in
2 processes, and reranking split over processes writes the same run file as one process.

Data assignment: with packing off, global step s holds rows [s*B, (s+1)*B) of the shuffled stream in
both set-ups (process p reads rows p, p+2, ... of that stream, B/2 per step), only the row order differs.
The loss is a token mean over the whole batch and the gradient a sum, so both agree up to float
reassociation (~1e-7 here), hence the 1e-5 tolerance. Same process count -> bitwise equal.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import train_fixtures as F
from rrjax import distributed
from rrjax.train.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
TINY_GIN = str(ROOT / "configs" / "sft" / "tiny_cpu.gin")
DIST_ENV = ("RRJAX_COORDINATOR_ADDRESS", "RRJAX_NUM_PROCESSES", "RRJAX_PROCESS_ID", "RRJAX_LOCAL_DEVICE_IDS",
            "RRJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "JAX_LOCAL_DEVICE_IDS")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(mode: str, spec: dict, workdir: Path, *, processes: int, devices: int, timeout: float = 240) -> list[str]:
  """Runs the worker as `processes` processes of `devices` CPU devices each; returns their stdouts.
  Any failure or timeout kills every child and fails with their stderr tails."""
  spec_path = workdir / f"spec_{mode}_{time.monotonic_ns()}.json"
  spec_path.write_text(json.dumps(spec))
  port = _free_port()
  children = []
  for pid in range(processes):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    # Later runs reuse the executables of earlier ones (same HLO, so the same numbers): half the time.
    env.update(JAX_COMPILATION_CACHE_DIR=str(workdir / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if processes > 1:
      env.update(RRJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", RRJAX_NUM_PROCESSES=str(processes),
                 RRJAX_PROCESS_ID=str(pid))
    log = spec_path.with_suffix(f".{pid}.log")
    out = open(log, "w+")
    proc = subprocess.Popen([sys.executable, str(WORKER), mode, str(spec_path)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    children.append((proc, out))
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while True:
      codes = [p.poll() for p, _ in children]
      if any(c not in (None, 0) for c in codes):
        failed = f"exit codes {codes}"
        break
      if all(c == 0 for c in codes):
        break
      if time.monotonic() > deadline:
        failed = f"timed out after {timeout:.0f} s (exit codes {codes})"
        break
      time.sleep(0.1)
  finally:
    for p, _ in children:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  logs = []
  for _, out in children:
    out.seek(0)
    logs.append(out.read())
    out.close()
  if failed:
    tails = "\n".join(f"--- process {i}:\n{text[-3000:]}" for i, text in enumerate(logs))
    pytest.fail(f"{mode} with {processes} processes: {failed}\n{tails}")
  return logs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("multihost")
  F.small_tokenizer(d / "tok")
  F.write_sft(d / "sft.json")
  return d


STEPS = 4


def _train_spec(workdir: Path, run: str, **extra) -> dict:
  params = {"TrainConfig.num_steps": STEPS, "TrainConfig.batch_size": 8, "SFTDataConfig.packing": False,
            "SFTDataConfig.data_dir": repr(str(workdir / "sft_data")), "CheckpointConfig.every_steps": 2,
            "OptimizerConfig.lr": 1e-2, "OptimizerConfig.warmup_ratio": 0.0,
            "OptimizerConfig.schedule": "'constant'",  # a resume may stop early: same lr at every step
            "MeshConfig.data": 2, "MeshConfig.fsdp": 2, "MeshConfig.tensor": 2, **extra}
  return {"gin_files": [TINY_GIN],
          "gin_params": F.gin_params(workdir / run, workdir / "sft.json", workdir / "tok", **params)}


def _params(run_dir: Path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(run_dir / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def two_process_run(workdir):
  """An uninterrupted 2 x 4-device SFT run (shared by the equivalence and the resume tests)."""
  logs = launch("train", _train_spec(workdir, "two"), workdir, processes=2, devices=4)
  assert "new run" in logs[0]
  return workdir / "two"


@pytest.mark.slow
def test_two_processes_train_like_one_process_of_eight_devices(workdir, two_process_run):
  launch("train", _train_spec(workdir, "one"), workdir, processes=1, devices=8)
  one, two = read_metrics(workdir / "one"), read_metrics(two_process_run)
  assert [m["step"] for m in two] == list(range(1, STEPS + 1))  # logged once, by process 0
  np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=0, atol=1e-5)
  np.testing.assert_allclose([m["tokens"] for m in two], [m["tokens"] for m in one])
  assert one[0]["loss"] != one[-1]["loss"]  # the parameters moved
  p1, p2 = _params(workdir / "one"), _params(two_process_run)  # the export gathered every shard
  assert sorted(p1) == sorted(p2)
  for name in p1:
    np.testing.assert_allclose(p2[name], p1[name], rtol=0, atol=1e-5, err_msg=name)
  # Orbax wrote one checkpoint from both processes; grain's iterator state is one file per process.
  data = two_process_run / "checkpoints" / str(STEPS) / "data"
  assert sorted(p.name for p in data.iterdir() if p.name.startswith("process_")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_exactly_in_two_processes(workdir, two_process_run):
  spec = _train_spec(workdir, "resumed", **{"TrainConfig.num_steps": 2})
  launch("train", spec, workdir, processes=2, devices=4)
  assert [m["step"] for m in read_metrics(workdir / "resumed")] == [1, 2]
  logs = launch("train", _train_spec(workdir, "resumed"), workdir, processes=2, devices=4)
  assert "resumed" in logs[0] and "at step 2" in logs[0]
  ref, resumed = read_metrics(two_process_run), read_metrics(workdir / "resumed")
  assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
  assert [m["loss"] for m in resumed] == [m["loss"] for m in ref]
  p_ref, p_res = _params(two_process_run), _params(workdir / "resumed")
  for name in p_ref:
    np.testing.assert_array_equal(p_res[name], p_ref[name], err_msg=name)


def test_rerank_across_two_processes_writes_the_single_process_run(workdir):
  spec = {"num_queries": 5, "depth": 9}
  launch("rerank", {**spec, "out": str(workdir / "one.run")}, workdir, processes=1, devices=1)
  launch("rerank", {**spec, "out": str(workdir / "two.run")}, workdir, processes=2, devices=2)
  one, two = (workdir / "one.run").read_text(), (workdir / "two.run").read_text()
  assert two == one and len(one.splitlines()) == 5 * 9
  # Query i went to process i % 2 only; no stray temporary files were left.
  shares = [json.loads((workdir / f"two.run.share{p}").read_text()) for p in (0, 1)]
  assert [s["seen"] for s in shares] == [["q0", "q2", "q4"], ["q1", "q3"]]
  assert shares[0]["counts"] == shares[1]["counts"] == [{"queries": 3}, {"queries": 2}]
  assert not [p for p in workdir.iterdir() if p.name.startswith(".two.run")]
  # The scripted model moved documents (windows 4/2, every third query reversed).
  first = [line.split()[2] for line in one.splitlines() if line.startswith("q2 ")]
  assert first != [f"d2_{j}" for j in range(9)]


def test_rerank_merge_in_one_process_keeps_query_order_and_checks_coverage():
  from rrjax import rerank
  queries = [{"qid": "b"}, {"qid": "a"}]
  run = rerank.rerank_across_processes(
      queries, lambda qs: {q["qid"]: {"x": 2.0, "y": 1.0} for q in reversed(qs)})
  assert list(run) == ["b", "a"] and list(run["a"]) == ["x", "y"]
  with pytest.raises(ValueError, match="wrong queries"):
    rerank.rerank_across_processes(queries, lambda qs: {"b": []})
  with pytest.raises(ValueError, match="more than once"):
    rerank.rerank_across_processes([{"qid": "a"}, {"qid": "a"}], lambda qs: {})
  assert rerank.share(list(range(7)), 1, 3) == [1, 4]


# ------------------------------------------------------------------ settings, without starting a job


@pytest.fixture
def clean_env(monkeypatch):
  for name in (*DIST_ENV, "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
               "MEGASCALE_NUM_SLICES"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_resolve_reads_flags_then_rrjax_then_jax_environment(clean_env):
  assert distributed.resolve() == ("single", {})
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.9:1")
  clean_env.setenv("RRJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  clean_env.setenv("RRJAX_NUM_PROCESSES", "4")
  clean_env.setenv("RRJAX_PROCESS_ID", "3")
  how, kw = distributed.resolve()
  assert how == "explicit" and kw["coordinator_address"] == "10.0.0.1:1234"
  assert (kw["num_processes"], kw["process_id"], kw["local_device_ids"]) == (4, 3, None)
  assert kw["cluster_detection_method"] == "deactivate"  # SLURM detection must not pin one GPU
  how, kw = distributed.resolve("h:5", 2, 1, "0,1")
  assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"], kw["local_device_ids"]) == \
      ("h:5", 2, 1, [0, 1])
  assert distributed.resolve(num_processes=1, process_id=0) == ("single", {})
  clean_env.setenv("RRJAX_DISTRIBUTED", "0")
  assert distributed.resolve() == ("single", {})


def test_resolve_rejects_incomplete_or_bad_settings(clean_env):
  clean_env.setenv("RRJAX_NUM_PROCESSES", "2")
  with pytest.raises(distributed.DistributedConfigError, match="missing coordinator address, process id"):
    distributed.resolve()
  with pytest.raises(distributed.DistributedConfigError, match="not in"):
    distributed.resolve("h:1", 2, 2)
  with pytest.raises(distributed.DistributedConfigError, match="host:port"):
    distributed.resolve("h", 2, 0)
  clean_env.setenv("RRJAX_NUM_PROCESSES", "two")
  with pytest.raises(distributed.DistributedConfigError, match="RRJAX_NUM_PROCESSES"):
    distributed.resolve()


def test_resolve_detects_slurm_and_tpu_pods(clean_env):
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "2")
  assert distributed.resolve() == ("single", {})  # the batch script itself, not an srun step
  clean_env.setenv("SLURM_STEP_NODELIST", "n[1-2]")
  clean_env.setenv("SLURM_PROCID", "1")
  assert distributed.resolve() == ("cluster", {})
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.resolve() == ("single", {})
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_NTASKS"):
    clean_env.delenv(name)
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
  assert distributed.resolve() == ("cluster", {})
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert distributed.resolve() == ("single", {})
  # What libtpu's probe leaves behind on a machine without TPUs is not a worker list.
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames or IP addresses, "
                   "please set env var `TPU_WORKER_HOSTNAMES` manually")
  assert distributed.resolve() == ("single", {})


def test_initialize_is_a_no_op_on_one_host(clean_env):
  import argparse
  args = distributed.add_flags(argparse.ArgumentParser()).parse_args([])
  assert distributed.initialize_from_args(args) is False
  assert distributed.initialize() is False  # idempotent
  import jax
  assert not jax.distributed.is_initialized()
  distributed.barrier("noop")
  assert distributed.allgather_bytes(b"x") == [b"x"]
  assert distributed.allgather_json({"tokens": 3}) == [{"tokens": 3}]


# ------------------------------------------------------------------ launch scripts


def test_launch_scripts_pass_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  scripts = sorted(p for d in ("launch", "scripts") for p in (ROOT / d).iterdir() if p.suffix in (".sh", ".sbatch"))
  assert {p.name for p in scripts} >= {"tpu_pod.sh", "slurm_gpu.sbatch", "setup.sh", "gpu_bench.sh"}
  proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _fake_bin(directory: Path, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


@pytest.mark.parametrize("ntasks,per_node", [(2, None), (4, 2)])
def test_slurm_script_gives_each_task_the_coordinator_and_its_index(tmp_path, ntasks, per_node):
  """The sbatch script under stand-in scontrol/srun/python: node 0 coordinates, each task its own id."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_bin(bin_dir, "scontrol", 'echo node-a; echo node-b\n')
  _fake_bin(bin_dir, "srun", 'while [ "$1" != bash ]; do shift; done\n'
            'for i in $(seq 0 $((SLURM_NTASKS - 1))); do\n'
            '  SLURM_PROCID=$i SLURM_LOCALID=$((i % ${SLURM_NTASKS_PER_NODE:-1})) "$@" || exit 1\n'
            'done\n')
  _fake_bin(bin_dir, "python", 'echo "$RRJAX_COORDINATOR_ADDRESS $RRJAX_NUM_PROCESSES $RRJAX_PROCESS_ID '
            '${RRJAX_LOCAL_DEVICE_IDS:-all} $PWD $*"\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RRJAX_", "CUDA_VISIBLE"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="1234", SLURM_NTASKS=str(ntasks),
             SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2", RRJAX_DIR=str(tmp_path),
             RRJAX_PYTHON=str(bin_dir / "python"))
  if per_node:
    env["SLURM_NTASKS_PER_NODE"] = str(per_node)
  proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "--gin_file", "a b.gin"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if not line.startswith("rrjax:")]
  local = [str(i % per_node) if per_node else "all" for i in range(ntasks)]
  assert lines == [f"node-a:12555 {ntasks} {i} {local[i]} {tmp_path} -m rrjax.train --gin_file a b.gin"
                   for i in range(ntasks)]


def test_tpu_pod_script_dry_run_prints_the_gcloud_commands():
  script = str(ROOT / "launch" / "tpu_pod.sh")
  common = ["bash", script, "--dry-run", "--name", "rr", "--zone", "us-east5-a", "--accelerator-type", "v5p-32"]
  create = subprocess.run([*common, "create"], capture_output=True, text=True, timeout=60)
  assert create.returncode == 0, create.stderr
  assert create.stdout.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rr", "--zone=us-east5-a",
                                   "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
  train = subprocess.run([*common, "train", "--", "--gin_file", "configs/sft/reasonrank_7b.gin"],
                         capture_output=True, text=True, timeout=60)
  assert train.returncode == 0, train.stderr
  first, follow = train.stdout.splitlines()
  assert "--worker=all" in first and "-m\\ rrjax.train\\ --gin_file\\ configs/sft/reasonrank_7b.gin" in first
  assert "--worker=0" in follow and "tail" in follow
  bad = subprocess.run([*common, "explode"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "unknown command" in bad.stderr
