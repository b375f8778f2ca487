"""Imports flow one way: model <- engine <- decode <- rerank, ranking <- rerank, and model <- train; ranking (prompts,
parser, windows, metrics, reward) knows nothing of models or engines; no cycles between rrjax's top-level modules
and subpackages, counting imports inside functions (read from the source, not run)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rrjax"


def _unit(module: str) -> str | None:
  """The layering unit of a module: `rrjax.<name>` for top-level modules and subpackages."""
  parts = module.split(".")
  if parts[0] != "rrjax":
    return None
  return ".".join(parts[:2]) if len(parts) > 1 else "rrjax"


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
  return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, module: str, is_package: bool, rrjax_only: bool = True) -> set[str]:
  """Every rrjax module (or with rrjax_only=False, every module) named by an import anywhere in `source`
  (function bodies included)."""
  package = module if is_package else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)  # `from rrjax import tokenizer`
  return {m for m in out if not rrjax_only or m == "rrjax" or m.startswith("rrjax.")}


def _existing(module: str) -> bool:
  rel = pathlib.Path(*module.split("."))
  return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  """unit -> the units it imports (the package facade `rrjax` itself left out: it may re-export anything)."""
  edges: dict[str, set[str]] = {}
  for path in PACKAGE.rglob("*.py"):
    src = _unit(_module_name(path))
    if src == "rrjax":
      continue
    targets = {_unit(m) for m in _imports(path) if _existing(m)}
    edges.setdefault(src, set()).update(t for t in targets if t not in (None, src, "rrjax"))
  return edges


def _reach(graph, start) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_cycles_between_units(graph):
  cycles = sorted(u for u in graph if u in _reach(graph, u))
  assert not cycles, {u: sorted(graph[u] & {v for v in graph if u in _reach(graph, v)}) for u in cycles}


def _facade_uses(path: pathlib.Path) -> list[str]:
  """`import rrjax` or `from rrjax import <not a module>` (the lazy facade hides what is really imported)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import) and any(a.name == "rrjax" for a in node.names):
      out.append("import rrjax")
    elif isinstance(node, ast.ImportFrom) and node.module == "rrjax" and not node.level:
      out += [f"from rrjax import {a.name}" for a in node.names if not _existing(f"rrjax.{a.name}")]
  return out


def test_the_package_uses_its_modules_not_its_facade():
  offenders = {str(p.relative_to(PACKAGE)): _facade_uses(p) for p in PACKAGE.rglob("*.py")
               if p != PACKAGE / "__init__.py" and p.parent.name != "bench"}
  assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("lower, upper", [
    ("rrjax.model", "rrjax.engine"), ("rrjax.engine", "rrjax.decode"), ("rrjax.decode", "rrjax.rerank"),
    ("rrjax.ranking", "rrjax.rerank"), ("rrjax.model", "rrjax.train"), ("rrjax.rerank", "rrjax.serve"),
    ("rrjax.engine", "rrjax.serve")])
def test_layers(graph, lower, upper):
  assert lower in _reach(graph, upper), f"{upper} is expected to build on {lower}"
  assert upper not in _reach(graph, lower), f"{lower} must not import {upper} (even indirectly)"


def test_model_knows_nothing_of_ranking_data_training(graph):
  reached = _reach(graph, "rrjax.model")
  for name in ("rrjax.ranking", "rrjax.data", "rrjax.train", "rrjax.rerank", "rrjax.synth", "rrjax.decode",
               "rrjax.engine", "rrjax.checkpoints", "rrjax.demo", "rrjax.serve"):
    assert name not in reached, f"rrjax.model reaches {name}"


def test_ranking_knows_nothing_of_models_or_engines(graph):
  """Ranking semantics are model-free: the backend that runs a model on the engine lives in rrjax.rerank."""
  reached = _reach(graph, "rrjax.ranking")
  for name in ("rrjax.model", "rrjax.engine", "rrjax.decode", "rrjax.rerank", "rrjax.checkpoints", "rrjax.serve"):
    assert name not in reached, f"rrjax.ranking reaches {name}"


def test_reranking_needs_no_training_stack(graph):
  for start in ("rrjax.rerank", "rrjax.ranking", "rrjax.decode", "rrjax.engine", "rrjax.checkpoints", "rrjax.eval",
                "rrjax.serve"):
    assert "rrjax.train" not in _reach(graph, start) | {start}, f"{start} reaches rrjax.train"


def test_imports_are_read_from_function_bodies_and_relative_forms():
  src = "import os\n\ndef f():\n  from rrjax.train import loop\n  from . import hf\n  from ..data import trec\n"
  got = _imports_of(src, "rrjax.model.qwen2", is_package=False)
  assert {"rrjax.train.loop", "rrjax.model.hf", "rrjax.data.trec"} <= got and "os" not in got
  assert {_unit(m) for m in got} == {"rrjax.train", "rrjax.model", "rrjax.data"}


GPU_BENCH_ENTRY_POINTS = ("rrjax.engine", "rrjax.decode", "rrjax.rerank", "rrjax.bench.engine", "rrjax.bench.slots",
                          "rrjax.bench.fidelity", "rrjax.bench.forward", "rrjax.bench.decode", "rrjax.bench.rerank")


def _module_path(module: str) -> pathlib.Path | None:
  rel = pathlib.Path(*module.split("."))
  for path in ((PACKAGE.parent / rel).with_suffix(".py"), PACKAGE.parent / rel / "__init__.py"):
    if path.exists():
      return path
  return None


def _all_imports(path: pathlib.Path) -> set[str]:
  return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py", rrjax_only=False)


def test_gpu_bench_path_needs_neither_grain_nor_tfds():
  """The GPU image (jax 0.11) has no grain or tensorflow_datasets: the modules scripts/gpu_bench.sh runs must
  import without them, and nothing they reach imports them even inside a function (module-level graph, read
  from the source), except rrjax.checkpoints when it saves or restores a training data iterator."""
  import os
  import subprocess
  import sys

  blocked = "import sys; sys.modules['grain'] = sys.modules['tensorflow_datasets'] = None; "
  code = blocked + "; ".join(f"import {m}" for m in GPU_BENCH_ENTRY_POINTS)
  env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  seen, todo = set(), list(GPU_BENCH_ENTRY_POINTS)
  while todo:
    module = todo.pop()
    path = _module_path(module)
    if module in seen or path is None:
      continue
    seen.add(module)
    parts = module.split(".")
    parents = [".".join(parts[:i]) for i in range(2, len(parts))]  # importing a.b.c runs a.b's __init__
    for name in _all_imports(path) | set(parents):
      if name.startswith("rrjax"):
        todo.append(name)
  assert "rrjax.engine.core" in seen and "rrjax.rerank.cli" in seen
  found = {}
  for module in seen:
    names = {n.split(".")[0] for n in _all_imports(_module_path(module))}
    found.update({module: sorted(names & {"grain", "tensorflow_datasets"})} if names & {"grain", "tensorflow_datasets"}
                 else {})
  assert set(found) <= {"rrjax.checkpoints"}, found
