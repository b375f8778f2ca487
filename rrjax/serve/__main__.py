"""`python -m rrjax.serve --model PATH [--gin_file rerank/...] [--host 127.0.0.1] [--port 8000]`: the /v1/rerank
API (also /rerank, /v2/rerank), /health, /v1/models and /metrics over one engine (rrjax/serve/app.py has the
request and response shapes). Settings come from upstream's defaults, then --gin_file/--gin_param
(`RerankSettings.*`), then the flags; a request may lower max_new_tokens and pick its window_size and stride.
SIGTERM stops intake, finishes the requests in flight and exits 0."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Sequence

from rrjax import cli
from rrjax.rerank.cli import _mesh, _positive, settings_from_gin
from rrjax.rerank.settings import FIELDS
from rrjax.serve.app import Limits


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  d = Limits()
  ap = argparse.ArgumentParser(prog="python -m rrjax.serve", description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="a Hugging Face Qwen2/Qwen3 directory or an rrjax run")
  ap.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
  ap.add_argument("--port", type=int, default=8000, help="default: 8000")
  ap.add_argument("--gin_file", action="append", default=[], help="gin file(s) binding RerankSettings.*")
  ap.add_argument("--gin_param", action="append", default=[], help="e.g. 'RerankSettings.window = 20'")
  ap.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on accelerators)")
  ap.add_argument("--mesh", type=_mesh, help="D,F,T over this process's devices (default: by the model's size)")
  ap.add_argument("--mode", choices=("listwise", "full"), help="listwise (default) or full-list windows")
  ap.add_argument("--window", type=_positive, help="passages per window (a request's window_size overrides)")
  ap.add_argument("--stride", type=_positive, help="window step (a request's stride overrides)")
  ap.add_argument("--max-passage-tokens", type=int, help="passages cut to this many tokens")
  ap.add_argument("--max-new-tokens", type=_positive, help="per window; requests may ask for fewer")
  ap.add_argument("--batch-size", type=_positive, help="decode slots shared by all requests (default: 16, or as "
                  "many as memory holds if fewer)")
  limits = ap.add_argument_group("limits")
  limits.add_argument("--max-documents", type=_positive, default=None,
                      help="documents per request (default: RerankSettings.top_k, 100)")
  limits.add_argument("--max-query-chars", type=_positive, default=d.max_query_chars, help="default: %(default)s")
  limits.add_argument("--max-document-chars", type=_positive, default=d.max_document_chars,
                      help="title + text of one document (default: %(default)s)")
  limits.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes, help="default: %(default)s")
  limits.add_argument("--max-queued-windows", type=_positive, default=1024,
                      help="windows of accepted, unfinished requests; beyond it 429 with Retry-After "
                      "(default: %(default)s)")
  limits.add_argument("--request-timeout-s", type=_positive_float, default=d.request_timeout_s,
                      help="504 after this, the request's windows cancelled (default: %(default)s)")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  import uvicorn

  from rrjax.serve.app import create_app
  from rrjax.serve.reranker import Reranker

  args = build_parser().parse_args(argv)
  settings = settings_from_gin(args.gin_file, args.gin_param)
  flags = {f: getattr(args, f) for f in ("mode", "window", "stride", "max_passage_tokens", "max_new_tokens",
                                         "batch_size", "mesh") if getattr(args, f, None) is not None}
  settings = dataclasses.replace(settings, **flags)
  if settings.mode not in ("listwise", "full"):
    raise ValueError(f"mode: the server runs listwise or full windows, not {settings.mode!r}")
  max_documents = args.max_documents or settings.top_k
  if max_documents > settings.top_k:  # more would be cut by top_k: the API would silently not rank them
    raise ValueError(f"--max-documents {max_documents} exceeds RerankSettings.top_k {settings.top_k}")
  limits = Limits(max_documents, args.max_query_chars, args.max_document_chars, args.max_body_bytes,
                  args.request_timeout_s)
  reranker = Reranker.load(args.model, dtype=args.dtype, max_queued_windows=args.max_queued_windows,
                           **{f: getattr(settings, f) for f in FIELDS})
  app = create_app(reranker, limits)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                          lifespan="on")
  server = uvicorn.Server(config)
  # uvicorn drains on SIGTERM (no new connections, in-flight requests finish, then the lifespan closes the
  # reranker) and afterwards re-raises the signal to the handler it found: a no-op one makes that exit 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  print(f"rrjax.serve: {args.model} ({settings.mode}, window "
        f"{settings.window}, stride {settings.stride}, {settings.max_new_tokens} new tokens) on "
        f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  server.run()
  return 0


def console() -> None:
  """The `rrjax-serve` console script."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.serve")
