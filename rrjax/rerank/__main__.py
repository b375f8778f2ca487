from rrjax import cli
from rrjax.rerank.cli import main

if __name__ == "__main__":
  cli.run(main, prog="rrjax.rerank")
