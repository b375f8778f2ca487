"""Shared entry-point behaviour: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

# Every error that rrjax raises for bad input is a ValueError subclass naming the file and the line or field.
USER_ERRORS = (ValueError, OSError)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        prog: str | None = None) -> None:
  prog = prog or os.path.basename(sys.argv[0])
  from rrjax import hardware
  hardware.skip_absent_tpu()  # before any device is touched: quiet CPU runs with libtpu installed
  try:
    code = main(argv)
  except USER_ERRORS as e:
    if os.environ.get("RRJAX_DEBUG"):
      raise
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
