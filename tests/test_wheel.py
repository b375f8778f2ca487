"""A plain (non-editable) `pip install` of rrjax works from any directory.

The wheel is built from the source files, installed into a fresh venv and used from a temporary directory that
is not the repository: every gin file under configs/ parses through its entry point's parser from the installed
copy, `rrjax-synth` + `rrjax-train` run one SFT step of the tiny config, `rrjax-eval` scores DL19 and
`rrjax-bright --first-stage-only` prints the paper's first-stage row from the bundled runs.

The fresh venv gets only the wheel (`--no-deps`, so no network). Its dependencies come from this test's own venv
through a plain path line in a .pth file: that puts the packages on sys.path but runs none of that venv's .pth
files, so the editable install's path hook is never installed (asserted: rrjax is imported from the new venv).
The test extras are made unimportable in the new venv (asserted too): the package must not need torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "rrjax", "configs")
TEST_ONLY = ("torch", "transformers", "pytest", "hypothesis", "pytrec_eval")
SCRIPTS = ("rrjax-train", "rrjax-rerank", "rrjax-eval", "rrjax-export", "rrjax-synth", "rrjax-demo", "rrjax-bright",
           "rrjax-retrieve", "rrjax-serve")
DL19 = ROOT / "tests" / "data" / "trec" / "dl19"

# Runs inside the new venv: where rrjax comes from, and every gin file through its entry point's parser.
CHECK = '''
import importlib.metadata, importlib.util, json, sys, sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"]).resolve()
import rrjax
from rrjax import gin_config
from rrjax import demo
from rrjax.rerank import cli as rerank_cli
from rrjax.train import __main__ as train_entry

out = {"rrjax": str(Path(rrjax.__file__).resolve()), "site": str(site), "config_root": str(gin_config.CONFIG_ROOT),
       "dist": str(Path(importlib.metadata.distribution("rrjax").locate_file("rrjax")).resolve()),
       "importable": [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None],
       "scripts": sorted(e.name for e in importlib.metadata.entry_points(group="console_scripts")
                         if e.value.startswith("rrjax."))}
for entry in importlib.metadata.entry_points(group="console_scripts"):
  if entry.value.startswith("rrjax."):
    assert callable(entry.load()), entry
parsed = {}
for name in json.loads(sys.argv[1]):
  kind = name.split("/")[0]
  if kind in ("sft", "grpo"):
    config = train_entry.parse_config([name], [])
    assert config.trainer == kind, (name, config.trainer)
    what = f"{config.trainer} {config.model.name}"
  elif kind in ("model", "mesh"):  # fragments: on top of a whole recipe
    config = train_entry.parse_config(["sft/tiny_cpu.gin", name], [])
    what = f"{config.model.name} {config.mesh}"
  elif kind == "rerank":
    settings = rerank_cli.settings_from_gin([name])
    what = f"{settings.mode} {settings.max_passage_tokens}"
  elif name == "demo.gin":
    config, _ = demo.parse_config([name], [])
    what = f"{config.sft.num_steps} {config.grpo.num_steps}"
  else:
    raise SystemExit(f"{name}: no entry point parses this folder of configs; add it to tests/test_wheel.py")
  parsed[name] = [str(gin_config.resolve(name).resolve()), what]
out["parsed"] = parsed
print(json.dumps(out))
'''


def _run(cmd, cwd, env, timeout=300):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _build_flags() -> list[str]:
  """Build with this venv's setuptools when it is recent enough (no network), else in pip's isolated env."""
  try:
    import setuptools
    if int(setuptools.__version__.split(".")[0]) >= 77:  # pyproject.toml's build-system requirement
      return ["--no-build-isolation", "--no-index"]
  except ImportError:
    pass
  return []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(the new venv's python, the environment to run it in, the wheel) after a non-editable install."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in BUILD_INPUTS:  # a copy, so that the build leaves no build/ or egg-info in the checkout
    item = ROOT / name
    if item.is_dir():
      shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy2(item, src / name)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
  _run([*pip, "wheel", "--no-deps", *_build_flags(), "-w", str(tmp / "dist"), str(src)], tmp, os.environ)
  (wheel,) = (tmp / "dist").glob("rrjax-*.whl")
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, os.environ)
  python = venv / "bin" / "python"
  # Installed before the dependencies' path exists in the venv, so pip sees no other rrjax there.
  _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp, os.environ)
  site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp, os.environ).stdout.strip())
  # A None in sys.modules makes `import torch` fail and find_spec("torch") return None, as if it were absent.
  (site / "zz_rrjax_test_deps.pth").write_text(
      f"import sys; sys.modules.update(dict.fromkeys({TEST_ONLY!r}))\n{sysconfig.get_paths()['purelib']}\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
  env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  work = tmp / "elsewhere"
  work.mkdir()
  return python, env, work, wheel


def test_wheel_carries_configs_assets_and_scripts(installed):
  *_, wheel = installed
  names = set(zipfile.ZipFile(wheel).namelist())
  configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file())
  assert configs and {f"rrjax/{c}" for c in configs} <= names
  assets = [p.relative_to(ROOT).as_posix() for p in (ROOT / "rrjax" / "assets").rglob("*") if p.is_file()]
  assert {"rrjax/assets/qwen2.5-tokenizer/tokenizer.json", "rrjax/assets/bright/LICENSE-ReasonRank.txt",
          "rrjax/assets/bright/runs/stackoverflow.reasonir_gpt4cot_top100.txt.gz"} <= set(assets) <= names
  assert not [n for n in names if n.startswith(("tests/", "configs/", "launch/", "scripts/"))]
  entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  text = zipfile.ZipFile(wheel).read(entry_points).decode()
  assert all(f"{s} = " in text for s in SCRIPTS), text


@pytest.mark.slow
def test_installed_package_runs_from_another_directory(installed):
  python, env, work, _ = installed
  configs = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.gin"))
  proc = _run([str(python), "-c", CHECK, json.dumps(configs), ",".join(TEST_ONLY)], work, env, timeout=240)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "ERROR" not in proc.stderr, proc.stderr  # gin's package-resource reader would log misses
  site = Path(out["site"])
  assert Path(out["rrjax"]).is_relative_to(site) and Path(out["dist"]).is_relative_to(site), out
  assert Path(out["config_root"]) == site / "rrjax" / "configs"
  assert out["importable"] == [], "test-only packages are visible in the venv"
  assert set(SCRIPTS) <= set(out["scripts"])
  assert sorted(out["parsed"]) == configs
  for name, (path, _) in out["parsed"].items():
    assert path == str(site / "rrjax" / "configs" / name), (name, path)  # the installed copy, includes too

  # The tiny SFT recipe for one step on synthesized data, names resolved against the installed configs.
  _run(["rrjax-synth", "--out", "data", "--num_train", "16", "--num_test", "2"], work, env)
  train = ["rrjax-train", "--gin_file", "sft/tiny_cpu.gin", "--gin_param", "TrainConfig.run_dir = 'run'",
           "--gin_param", "TrainConfig.num_steps = 1",
           "--gin_param", "SFTDataConfig.train_files = ('data/train/sft.json',)"]
  _run(train, work, env, timeout=600)
  metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any(m.get("step") == 1 and "loss" in m for m in metrics), metrics
  assert (work / "run" / "operative_config.gin").is_file() and (work / "run" / "hf" / "config.json").is_file()

  proc = _run(["rrjax-eval", "--qrels", str(DL19 / "qrels.dl19-passage.txt.gz"),
               "--run", str(DL19 / "BM25.dl19.top100.trec.gz"), "--metrics", "ndcg@10", "--json"], work, env)
  assert round(json.loads(proc.stdout)["mean"]["ndcg@10"], 4) == 0.5058

  # The bundled first-stage runs and qrels: the paper's first-stage row.
  proc = _run(["rrjax-bright", "--first-stage-only"], work, env)
  assert proc.stdout.strip().endswith("| 30.59 |") and "stackoverflow: skipped 12" in proc.stderr

  bad = subprocess.run(["rrjax-train", "--gin_file", "sft/nope.gin"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == "rrjax-train: error: sft/nope.gin: gin file not found"
