"""A small OpenAI-compatible chat-completions client on the `openai` SDK: bounded concurrency, an on-disk cache.

POST {base_url}/chat/completions with `{"model", "messages"[, "temperature", "max_tokens"]}` through
`openai.OpenAI(base_url=...)`, so any OpenAI-compatible server works. `Authorization: Bearer <key>` is sent only
when `api_key_env` names an environment variable, read at request time; the key is never written to the cache,
logged or put in an error message. The SDK's own credentials from the environment (OPENAI_API_KEY, ...) are not used.

- Retries: the SDK decides what to retry (HTTP 408/409/429/5xx, timeouts, connection errors; not a Retry-After
  over 2 minutes) and re-sends, up to `max_retries` times. rrjax sets the wait: backoff_s * 2**retry, capped at
  max_backoff_s, or the server's Retry-After(-ms) when that asks for longer (within the cap). Other HTTP errors
  fail at once. A request that fails is counted in `stats.failed`, logged in one line, and comes back as None.
- Malformed answers (a 200 whose body is not JSON or has no `choices[0].message` with string content)
  are counted in `stats.malformed` and come back as None; they are not cached, so a rerun asks again.
- Cache: one file per request, `cache_dir/<sha[:2]>/<sha>.json`, sha = sha256 of the canonical JSON body,
  holding the server's JSON verbatim, written atomically as soon as the answer arrives. A killed run therefore
  resumes without asking anything it already has an answer for. Identical requests in one batch are sent once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import openai

from rrjax.fileio import atomic_open

Messages = Sequence[Mapping[str, str]]
log = logging.getLogger("rrjax.synth")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Where and how to ask. api_key_env is the *name* of an environment variable, never the key."""

  base_url: str = "https://api.deepseek.com/v1"
  model: str = "deepseek-reasoner"
  api_key_env: str | None = "OPENAI_API_KEY"
  max_concurrency: int = 8
  max_retries: int = 5
  timeout_s: float = 600.0
  backoff_s: float = 1.0
  max_backoff_s: float = 60.0
  temperature: float | None = None
  max_tokens: int | None = None
  cache_dir: str | None = None

  def __post_init__(self):
    if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
      raise ValueError("need max_concurrency >= 1, max_retries >= 0 and timeout_s > 0")
    if not self.base_url.startswith(("http://", "https://")):
      raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


@dataclasses.dataclass(frozen=True)
class ChatResponse:
  """The first choice: its content and, when the server sends one, its separate reasoning."""

  content: str
  reasoning: str | None
  cached: bool = False


@dataclasses.dataclass
class ClientStats:
  sent: int = 0          # HTTP requests made, retries included
  answered: int = 0      # well-formed answers received over HTTP
  cache_hits: int = 0
  retries: int = 0
  failed: int = 0        # gave up (retries exhausted or a non-retryable HTTP error)
  malformed: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


class _Malformed(Exception):
  pass


def request_key(body: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def parse_response(raw: Any) -> ChatResponse:
  """choices[0].message -> ChatResponse; `reasoning_content` (DeepSeek) or `reasoning` (vLLM) if present."""
  try:
    message = raw["choices"][0]["message"]
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
  except (KeyError, IndexError, TypeError, AttributeError):
    raise _Malformed("no choices[0].message") from None
  if not isinstance(content, str) or (reasoning is not None and not isinstance(reasoning, str)):
    raise _Malformed("message content is not a string")
  if not content and not reasoning:
    raise _Malformed("empty message")
  return ChatResponse(content, reasoning)


class _OpenAI(openai.OpenAI):
  """The SDK client, waiting between its retries through `wait(retries_taken, retry_after_s)` instead of its own
  jittered sleep, so the schedule is rrjax's and a test can fake the clock."""

  def __init__(self, *, wait: Callable[[int, float | None], None], **kwargs):
    super().__init__(**kwargs)
    self._wait = wait

  def _sleep_for_retry(self, *, retries_taken, max_retries, options, response) -> None:
    self._wait(retries_taken, self._parse_retry_after_header(response.headers) if response is not None else None)


if not all(callable(getattr(openai.OpenAI, m, None)) for m in ("_sleep_for_retry", "_parse_retry_after_header")):
  # Without them the SDK would wait on its own schedule and stats.retries would stay 0: fail loudly instead.
  raise ImportError(f"openai {openai.__version__} lacks the retry hooks rrjax.synth.client uses; need openai>=3.57")


class ChatClient:
  """Thread-pooled chat-completions calls through the openai SDK, with a per-request file cache."""

  def __init__(self, config: ClientConfig, sleep: Callable[[float], None] = time.sleep):
    self.config = config
    self.stats = ClientStats()
    self._sleep = sleep
    self._lock = threading.Lock()
    self.url = config.base_url.rstrip("/") + "/chat/completions"
    # api_key is a placeholder the SDK insists on: every request sets (or omits) Authorization itself.
    self._sdk = _OpenAI(base_url=config.base_url, api_key="set-per-request", max_retries=config.max_retries,
                        timeout=config.timeout_s, wait=self._wait)

  def body(self, messages: Messages) -> dict[str, Any]:
    body: dict[str, Any] = {"model": self.config.model, "messages": [dict(m) for m in messages]}
    if self.config.temperature is not None:
      body["temperature"] = self.config.temperature
    if self.config.max_tokens is not None:
      body["max_tokens"] = self.config.max_tokens
    return body

  def _count(self, name: str, n: int = 1) -> None:
    with self._lock:
      setattr(self.stats, name, getattr(self.stats, name) + n)

  def _cache_path(self, key: str) -> Path | None:
    return Path(self.config.cache_dir) / key[:2] / f"{key}.json" if self.config.cache_dir else None

  def _cached(self, key: str) -> ChatResponse | None:
    path = self._cache_path(key)
    if path is None or not path.exists():
      return None
    try:
      response = parse_response(json.loads(path.read_text(encoding="utf-8"))["response"])
    except (OSError, ValueError, KeyError, TypeError, _Malformed):
      return None  # unreadable entry: ask again (and overwrite it)
    return dataclasses.replace(response, cached=True)

  def _headers(self) -> dict[str, Any]:
    """Authorization from `api_key_env` only. Per-request headers win over the SDK's environment-derived ones
    (OPENAI_API_KEY, OPENAI_CUSTOM_HEADERS, OPENAI_ORG_ID, OPENAI_PROJECT_ID), which rrjax never sends."""
    headers: dict[str, Any] = {h: openai.Omit() for h in ("Authorization", "OpenAI-Organization", "OpenAI-Project")}
    name = self.config.api_key_env
    if name:
      key = os.environ.get(name)
      if not key:
        raise ValueError(f"environment variable {name} (the API key) is not set")
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def _wait(self, retries_taken: int, retry_after: float | None) -> None:
    self._count("retries")
    self._count("sent")  # the SDK re-sends right after the wait
    delay = self.config.backoff_s * 2 ** retries_taken
    if retry_after is not None:
      delay = max(delay, retry_after)
    self._sleep(min(delay, self.config.max_backoff_s))

  def _ask(self, body: dict[str, Any], key: str) -> ChatResponse | None:
    self._count("sent")
    try:
      reply = self._sdk.chat.completions.with_raw_response.create(**body, extra_headers=self._headers())
    except openai.APIStatusError as e:  # not retryable, or still failing after max_retries
      return self._failed(f"HTTP {e.status_code} {e.response.reason_phrase}")
    except openai.APITimeoutError:
      return self._failed("timed out")
    except openai.APIConnectionError:
      return self._failed("connection failed")
    try:
      raw = json.loads(reply.content)  # parsed here, not by the SDK: the cache keeps the server's JSON verbatim
      response = parse_response(raw)
    except (ValueError, _Malformed):  # ValueError: not JSON / not UTF-8
      self._count("malformed")
      return None
    self._count("answered")
    path = self._cache_path(key)
    if path is not None:
      with atomic_open(path) as f:
        json.dump({"request": body, "response": raw}, f, ensure_ascii=False)
    return response

  def _failed(self, what: str) -> None:
    self._count("failed")
    log.warning("%s: %s; giving up on this request", self.url, what)

  def complete_many(self, messages_list: Sequence[Messages],
                    on_result: Callable[[int, ChatResponse | None], None] | None = None) -> list[ChatResponse | None]:
    """One answer (or None) per conversation, in order. `on_result(i, answer)` runs on this thread as
    answers arrive; if it raises, queued requests are cancelled, in-flight ones finish (and are cached)."""
    bodies = [self.body(m) for m in messages_list]
    keys = [request_key(b) for b in bodies]
    results: list[ChatResponse | None] = [None] * len(bodies)
    pending: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
      cached = self._cached(key)
      if cached is not None:
        self._count("cache_hits")
        results[i] = cached
        if on_result is not None:
          on_result(i, cached)
      else:
        pending.setdefault(key, []).append(i)
    if not pending:
      return results
    self._headers()  # a missing key fails once, before any thread starts
    pool = cf.ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="chat")
    try:
      futures = {pool.submit(self._ask, bodies[idx[0]], key): key for key, idx in pending.items()}
      for future in cf.as_completed(futures):
        answer = future.result()
        for i in pending[futures[future]]:
          results[i] = answer
          if on_result is not None:
            on_result(i, answer)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    return results

  def complete(self, messages: Messages) -> ChatResponse | None:
    return self.complete_many([messages])[0]
