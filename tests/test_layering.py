"""Imports flow one way: model <- engine <- decode <- ranking <- rerank, and model <- train; no cycles between rrjax's
top-level modules and subpackages, counting imports inside functions (read from the source, not run)."""

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


def _imports_of(source: str, module: str, is_package: bool) -> set[str]:
  """Every rrjax module named by an import anywhere in `source` (function bodies included)."""
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
  return {m for m in out if m == "rrjax" or m.startswith("rrjax.")}


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
    ("rrjax.model", "rrjax.engine"), ("rrjax.engine", "rrjax.decode"), ("rrjax.decode", "rrjax.ranking"),
    ("rrjax.ranking", "rrjax.rerank"), ("rrjax.model", "rrjax.train")])
def test_layers(graph, lower, upper):
  assert lower in _reach(graph, upper), f"{upper} is expected to build on {lower}"
  assert upper not in _reach(graph, lower), f"{lower} must not import {upper} (even indirectly)"


def test_model_knows_nothing_of_ranking_data_training(graph):
  reached = _reach(graph, "rrjax.model")
  for name in ("rrjax.ranking", "rrjax.data", "rrjax.train", "rrjax.rerank", "rrjax.synth", "rrjax.decode",
               "rrjax.engine", "rrjax.checkpoints", "rrjax.demo"):
    assert name not in reached, f"rrjax.model reaches {name}"


def test_reranking_needs_no_training_stack(graph):
  for start in ("rrjax.rerank", "rrjax.ranking", "rrjax.decode", "rrjax.engine", "rrjax.checkpoints", "rrjax.eval"):
    assert "rrjax.train" not in _reach(graph, start) | {start}, f"{start} reaches rrjax.train"


def test_imports_are_read_from_function_bodies_and_relative_forms():
  src = "import os\n\ndef f():\n  from rrjax.train import loop\n  from . import hf\n  from ..data import trec\n"
  got = _imports_of(src, "rrjax.model.qwen2", is_package=False)
  assert {"rrjax.train.loop", "rrjax.model.hf", "rrjax.data.trec"} <= got and "os" not in got
  assert {_unit(m) for m in got} == {"rrjax.train", "rrjax.model", "rrjax.data"}
