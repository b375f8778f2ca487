"""`python -m rrjax.rerank` and the `rrjax-rerank` console script (rrjax.rerank.cli has the flags)."""

from rrjax import cli
from rrjax.rerank.cli import main


def console() -> None:
  """The `rrjax-rerank` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.rerank")
