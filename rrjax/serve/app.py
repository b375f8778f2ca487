"""The HTTP side of `python -m rrjax.serve`: a FastAPI app over one rrjax.serve.reranker.Reranker.

POST /v1/rerank (and /rerank, /v2/rerank) takes the fields that Cohere, Jina and vLLM share (`model`, `query`,
`documents` as strings or {"text", "title"}, `top_n`, `return_documents`) and rrjax's own `reasoning`,
`window_size`, `stride`, `max_new_tokens`; it answers `id`, `model`, `usage`, `results` (best first:
`index`, `relevance_score` = 1 - rank / n, `document` when asked) and `reasoning` (per window) when asked.
Bad input is a 4xx whose `detail` is one line naming the field: 415 (not JSON), 400 (invalid JSON or a
semantic error such as top_n < 1), 413 (body, documents or text over the limits), 422 (a field of the wrong
type, missing or unknown), 429 with Retry-After (the window queue is full), 504 (the deadline passed; the
request's windows are cancelled). A client that disconnects has its queued windows cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
import uuid
from typing import Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from rrjax.serve.reranker import Cancelled, QueueFull, Reranker

ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")


@dataclasses.dataclass(frozen=True)
class Limits:
  max_documents: int = 100
  max_query_chars: int = 4_000
  max_document_chars: int = 20_000
  max_body_bytes: int = 16 << 20
  request_timeout_s: float = 600.0


class DocumentIn(BaseModel):
  model_config = ConfigDict(extra="ignore")  # Cohere's documents may carry other fields (rank_fields' own)
  text: StrictStr
  title: StrictStr | None = None


class RerankRequest(BaseModel):
  # Unknown fields are refused (a misspelt `window_sise` must not pass silently); the other APIs' fields that
  # do not change a listwise ranking are accepted and ignored.
  model_config = ConfigDict(extra="forbid")
  model: StrictStr | None = None
  query: StrictStr
  documents: list[Union[StrictStr, DocumentIn]]
  top_n: StrictInt | None = None
  return_documents: StrictBool = False
  reasoning: StrictBool = False
  window_size: StrictInt | None = None
  stride: StrictInt | None = None
  max_new_tokens: StrictInt | None = None
  max_chunks_per_doc: StrictInt | None = None  # Cohere v1
  max_tokens_per_doc: StrictInt | None = None  # Cohere v2
  truncate_prompt_tokens: StrictInt | None = None  # vLLM


class HttpError(Exception):
  def __init__(self, status: int, detail: str, headers: dict | None = None):
    super().__init__(detail)
    self.status, self.detail, self.headers = status, " ".join(detail.split()), headers


def _validation_line(e: ValidationError) -> str:
  """The first error, one line: `documents.3: Input should be a valid string`."""
  err = e.errors()[0]
  loc = [str(p) for p in err["loc"] if p not in ("str", "DocumentIn") and not str(p).startswith("function-")]
  field = ".".join(loc) or "body"
  if err["type"] == "extra_forbidden":
    return f"{field}: unknown field"
  return f"{field}: {err['msg']}"


def check(body: RerankRequest, reranker: Reranker, limits: Limits) -> None:
  """The limits and the semantic checks beyond the types (400 or 413 naming the field)."""
  if not body.query.strip():
    raise HttpError(400, "query: must not be empty")
  if len(body.query) > limits.max_query_chars:
    raise HttpError(413, f"query: {len(body.query)} characters; at most {limits.max_query_chars}")
  if not body.documents:
    raise HttpError(400, "documents: at least one document is required")
  if len(body.documents) > limits.max_documents:
    raise HttpError(413, f"documents: {len(body.documents)} documents; at most {limits.max_documents}")
  for i, d in enumerate(body.documents):
    n = len(d) if isinstance(d, str) else len(d.text) + len(d.title or "")
    if n > limits.max_document_chars:
      raise HttpError(413, f"documents.{i}: {n} characters; at most {limits.max_document_chars}")
  for name in ("top_n", "window_size", "stride", "max_new_tokens"):
    value = getattr(body, name)
    if value is not None and value < 1:
      raise HttpError(400, f"{name}: must be >= 1, got {value}")
  s = reranker.settings
  if body.max_new_tokens is not None and body.max_new_tokens > s.max_new_tokens:
    raise HttpError(400, f"max_new_tokens: {body.max_new_tokens} exceeds this server's {s.max_new_tokens}")
  if body.window_size is not None and body.window_size > limits.max_documents:
    raise HttpError(400, f"window_size: {body.window_size} exceeds this server's {limits.max_documents} documents")


class _EngineCollector:
  """Prometheus families read from the reranker at scrape time: windows, tokens, slots and queue."""

  def __init__(self, reranker: Reranker):
    self.reranker = reranker

  def collect(self):
    s = self.reranker.stats()
    e = s["engine"]
    for name, value, doc in (("rrjax_windows", s["windows"], "windows answered"),
                             ("rrjax_generated_tokens", s["completion_tokens"], "tokens generated"),
                             ("rrjax_prompt_tokens", s["prompt_tokens"], "window prompt tokens prefilled"),
                             ("rrjax_cancelled_requests", s["cancelled"], "requests cancelled (deadline, disconnect)"),
                             ("rrjax_slot_steps", e.get("slot_steps", 0), "decode steps times slots"),
                             ("rrjax_live_slot_steps", e.get("live_slot_steps", 0), "slot-steps advancing a window")):
      c = CounterMetricFamily(name, doc)
      c.add_metric([], value)
      yield c
    for name, value, doc in (
        ("rrjax_slot_occupancy", e.get("occupancy", 0.0), "fraction of decoded slot-steps that advanced a window"),
        ("rrjax_slots", e.get("slots", 0), "decode slots of the engine"),
        ("rrjax_active_slots", e.get("active_slots", 0), "slots decoding a window now"),
        ("rrjax_queued_windows", s["windows_queued"], "windows waiting for a slot"),
        ("rrjax_pending_windows", s["windows_left"], "windows of accepted, unfinished requests")):
      g = GaugeMetricFamily(name, doc)
      g.add_metric([], value)
      yield g


def create_app(reranker: Reranker, limits: Limits = Limits(), *, model_name: str | None = None) -> FastAPI:
  model_name = model_name or reranker.name
  registry = CollectorRegistry()
  requests = Counter("rrjax_requests", "rerank requests by HTTP status", ["status"], registry=registry)
  latency = Histogram("rrjax_request_seconds", "rerank request latency (200s)", registry=registry,
                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
  registry.register(_EngineCollector(reranker))
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    # uvicorn calls this after the in-flight requests finished (SIGTERM: no new connections meanwhile).
    await asyncio.get_running_loop().run_in_executor(None, reranker.close)

  app = FastAPI(title="rrjax.serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

  def error(e: HttpError) -> JSONResponse:
    requests.labels(str(e.status)).inc()
    return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

  async def read_body(request: Request) -> RerankRequest:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
      raise HttpError(415, f"content-type: application/json is required, got {kind or 'none'!r}")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_body_bytes:
      raise HttpError(413, f"body: {length} bytes; at most {limits.max_body_bytes}")
    raw = bytearray()
    async for chunk in request.stream():
      raw += chunk
      if len(raw) > limits.max_body_bytes:
        raise HttpError(413, f"body: over {limits.max_body_bytes} bytes")
    try:
      data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HttpError(400, f"body: invalid JSON ({e})") from None
    if not isinstance(data, dict):
      raise HttpError(422, f"body: a JSON object is required, got {type(data).__name__}")
    try:
      return RerankRequest.model_validate(data)
    except ValidationError as e:
      raise HttpError(422, _validation_line(e)) from None

  async def rerank(request: Request):
    t0 = time.perf_counter()
    try:
      body = await read_body(request)
      check(body, reranker, limits)
      overrides = {k: v for k, v in (("window", body.window_size), ("stride", body.stride),
                                     ("max_new_tokens", body.max_new_tokens)) if v is not None}
      docs = [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in body.documents]
      try:
        job = reranker.plan(body.query, docs, body.top_n, **overrides)
        future = asyncio.wrap_future(reranker.submit(job))
      except ValueError as e:
        raise HttpError(400, str(e)) from None
      except QueueFull as e:
        raise HttpError(429, f"queue: {e}; retry later", {"Retry-After": str(math.ceil(e.retry_after_s))}) from None
      try:
        result = await _wait(request, future, limits.request_timeout_s)
      except asyncio.TimeoutError:
        reranker.cancel(job)
        raise HttpError(504, f"request_timeout: not answered within {limits.request_timeout_s:g} s; its windows "
                        "were cancelled") from None
      except _Disconnected:
        reranker.cancel(job)
        requests.labels("499").inc()
        return PlainTextResponse("", status_code=499)
      except Cancelled:
        raise HttpError(503, "server: the request was cancelled (shutting down)") from None
    except HttpError as e:
      return error(e)
    except Exception as e:  # an engine failure: the request fails, the server stays up
      return error(HttpError(500, f"engine: {type(e).__name__}: {e}"))
    out = {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model or model_name,
           "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens},
           "results": [{"index": r.index, "relevance_score": r.relevance_score,
                        **({"document": dict(r.document)} if body.return_documents else {})}
                       for r in result.results]}
    if body.reasoning:
      out["reasoning"] = [{"start": w.start, "end": w.end, "text": w.text, "parser": w.parser}
                          for w in result.windows]
    requests.labels("200").inc()
    latency.observe(time.perf_counter() - t0)
    return JSONResponse(out)

  for path in ROUTES:
    app.add_api_route(path, rerank, methods=["POST"])

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "rrjax"}]}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

  return app


class _Disconnected(Exception):
  pass


async def _wait(request: Request, future: asyncio.Future, timeout_s: float):
  """The future's result; asyncio.TimeoutError after `timeout_s`, _Disconnected when the client leaves."""
  deadline = time.monotonic() + timeout_s
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise asyncio.TimeoutError
    done, _ = await asyncio.wait({future}, timeout=min(0.25, left))
    if done:
      return future.result()
    if await request.is_disconnected():
      raise _Disconnected
