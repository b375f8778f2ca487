"""gin at the entry points (train, rerank, demo): one way to find files, parse them and report errors.

A gin file name (`--gin_file sft/reasonrank_7b.gin`), and every `include` inside one (`include
'mesh/gpu_8.gin'`), resolves against the user's paths first: the working directory (and, for includes,
the directories of the files given); then rrjax's own configs (`CONFIG_ROOT`): the entry point's folder
(`rerank/` for rerank), then the root. `CONFIG_ROOT` is the configs/ that a wheel installs inside the
package (`rrjax/configs`), or the repository's top-level configs/ in a source checkout (the one copy
people edit); names that start with `configs/` resolve too. gin's errors become one-line ValueErrors. The
library never sees gin: `make()` returns the frozen dataclasses it takes.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  gin 0.5.0 needs it loaded before relative includes
import os
import re
import tokenize
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import gin
import gin.config


def _config_root() -> Path:
  package = Path(__file__).resolve().parent
  installed = package / "configs"  # a wheel maps the repository's configs/ here (setup.py)
  return installed if installed.is_dir() else package.parent / "configs"


CONFIG_ROOT = _config_root()

T = TypeVar("T")


def _roots(subdir: str | None) -> list[Path]:
  roots = [Path.cwd()]
  if subdir:
    roots.append(CONFIG_ROOT / subdir)
  return roots + [CONFIG_ROOT, CONFIG_ROOT.parent]  # the parent: `configs/mesh/gpu_8.gin` as written before


def resolve(name: str | Path, subdir: str | None = None) -> Path:
  """The gin file that `name` refers to (see the module docstring), or a ValueError naming it."""
  if Path(name).is_absolute():
    candidates = [Path(name)]
  else:
    candidates = [root / name for root in _roots(subdir)]
  for path in candidates:
    if path.is_file():
      return path
  raise ValueError(f"{name}: gin file not found")


def parse(gin_files: Sequence[str | Path], gin_params: Sequence[str], make: Callable[[], T], *,
          subdir: str | None = None) -> T:
  """Parses `gin_files` and `gin_params` afresh and returns `make()` (a configurable reading them)."""
  files = [resolve(f, subdir) for f in gin_files]
  search = list(dict.fromkeys([f.parent for f in files] + _roots(subdir)))
  with gin.unlock_config():
    gin.clear_config()
    # gin 0.5 keeps one global, ever-growing list of include prefixes: set it to this parse's own.
    gin.config._LOCATION_PREFIXES[:] = [""] + [str(p) for p in search]
    # Plain files only: gin's second reader imports `a.b` to look for `a/b/x.gin` and logs an ERROR line for
    # every search path a name is not under.
    gin.config._FILE_READERS[:] = [(open, os.path.isfile)]
    try:
      gin.parse_config_files_and_bindings([str(f) for f in files], None, finalize_config=False)
    except Exception as e:  # gin raises ValueError, KeyError, TypeError, IOError, TokenError; messages name file:line
      raise ValueError(f"gin ({', '.join(map(str, gin_files))}): {_one_line(e)}") from None
    for binding in gin_params:  # one at a time, so that an error names its binding rather than the files
      try:
        gin.parse_config(binding)
      except Exception as e:
        message = re.sub(r"\s*In bindings string line \d+.*$", "", _one_line(e))
        raise ValueError(f"gin binding {' '.join(binding.split())!r}: {message}") from None
    try:
      return make()
    except Exception as e:  # a value the configurable refuses: any of the files or bindings may have set it
      where = ", ".join([str(f) for f in gin_files] + [repr(" ".join(b.split())) for b in gin_params])
      raise ValueError(f"gin ({where or 'no bindings'}): {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
  if isinstance(e, tokenize.TokenError):  # ('unexpected EOF in multi-line statement', (1, 0))
    return f"{e.args[0]} (an unclosed bracket or quote?)"
  return " ".join(str(e).split()) or type(e).__name__
