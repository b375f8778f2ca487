"""Atomic writes: a file (or directory) appears whole at its path or not at all, even on a crash or a kill.

Everything is first written to a temporary sibling (same filesystem, so the rename is atomic), then
`os.replace`d onto the target; if the body raises, the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

PathLike = str | os.PathLike


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _sync_dir(directory: Path) -> None:
  with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
  """A temporary sibling path for a writer that takes a file name (pyarrow, matplotlib, safetensors); it
  replaces `path` when the body succeeds. The temporary keeps `path`'s suffix for writers that read it."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    # mkstemp makes the file 0600; give it the mode a plain open() would (or the old file's).
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
    os.replace(tmp, path)
    _sync_dir(path.parent)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()
    raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[io.IOBase]:
  """Opens a temporary sibling for writing ("w": UTF-8 text with "\\n" newlines, "wb": bytes); it replaces
  `path` when the body succeeds. A `.gz` path is gzipped (deterministically: no timestamp)."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
  with atomic_path(path) as tmp, open(tmp, "wb") as raw:
    stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if Path(path).name.endswith(".gz") else raw
    with contextlib.ExitStack() as stack:
      if stream is not raw:
        stack.enter_context(stream)
      f = stream if mode == "wb" else stack.enter_context(io.TextIOWrapper(stream, encoding="utf-8", newline="\n"))
      yield f
      f.flush()


def write_text(path: PathLike, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
  """A temporary sibling directory that replaces the directory `path` (an old one is removed) when the body
  succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    yield tmp
    if path.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
      os.replace(path, old / "x")
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
    _sync_dir(path.parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def removed_on_error(path: PathLike, enabled: bool = True) -> Iterator[Path]:
  """Undoes what the body adds to the directory `path` if the body raises: the entries it created there (and
  `path` itself, with any parent directories, when they did not exist before). Entries that were there before
  are left as they are, so a failed check on an existing run leaves that run untouched."""
  path = Path(path).absolute()
  top = path  # the outermost directory this body creates, removed whole on error
  while not top.parent.exists():
    top = top.parent
  before = set(os.listdir(path)) if path.is_dir() else None
  try:
    yield path
  except BaseException:
    if enabled:
      if before is None:
        if top.exists():
          shutil.rmtree(top, ignore_errors=True)
      elif path.is_dir():
        for name in set(os.listdir(path)) - before:
          entry = path / name
          if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
          else:
            with contextlib.suppress(FileNotFoundError):
              entry.unlink()
    raise
