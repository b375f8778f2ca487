"""A small OpenAI-compatible chat-completions client: bounded concurrency, retries, an on-disk cache.

POST {base_url}/chat/completions with `{"model", "messages"[, "temperature", "max_tokens"]}` and, when
`api_key_env` names a set environment variable, `Authorization: Bearer <its value>`. The key is read
at request time and never stored, logged or put in an error message.

- Retries: HTTP 429 and 5xx, timeouts and connection errors are retried up to `max_retries` times with
  exponential backoff (backoff_s * 2**attempt, capped at max_backoff_s; a Retry-After header wins when
  it asks for longer, within the cap). Other HTTP errors fail at once.
- Malformed answers (a 200 whose body is not JSON or has no `choices[0].message` with string content)
  are counted in `stats.malformed` and come back as None; they are not cached, so a rerun asks again.
- Cache: one file per request, `cache_dir/<sha[:2]>/<sha>.json`, sha = sha256 of the canonical JSON body,
  written atomically as soon as the answer arrives. A killed run therefore resumes without asking
  anything it already has an answer for. Identical requests in one batch are sent once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import email.utils
import hashlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rrjax.data.trec import atomic_open

Messages = Sequence[Mapping[str, str]]


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


class _Retryable(Exception):
  def __init__(self, what: str, retry_after: float | None = None):
    super().__init__(what)
    self.retry_after = retry_after


class _Malformed(Exception):
  pass


def request_key(body: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _retry_after(value: str | None) -> float | None:
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    try:
      parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
      return None
    return max(0.0, parsed.timestamp() - time.time())


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


class ChatClient:
  """Thread-pooled chat-completions calls with retries and a per-request file cache."""

  def __init__(self, config: ClientConfig, sleep: Callable[[float], None] = time.sleep):
    self.config = config
    self.stats = ClientStats()
    self._sleep = sleep
    self._lock = threading.Lock()
    self.url = config.base_url.rstrip("/") + "/chat/completions"

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

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    name = self.config.api_key_env
    if name:
      key = os.environ.get(name)
      if not key:
        raise ValueError(f"environment variable {name} (the API key) is not set")
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def _post_once(self, data: bytes) -> Any:
    request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
    self._count("sent")
    try:
      with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      if e.code == 429 or 500 <= e.code < 600:
        raise _Retryable(f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))) from None
      raise ValueError(f"{self.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(type(e).__name__) from None
    try:
      return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
      raise _Malformed("body is not JSON") from None

  def _ask(self, body: dict[str, Any], key: str) -> ChatResponse | None:
    data = json.dumps(body, ensure_ascii=False).encode()
    for attempt in range(self.config.max_retries + 1):
      try:
        raw = self._post_once(data)
        response = parse_response(raw)
      except _Malformed:
        self._count("malformed")
        return None
      except _Retryable as e:
        if attempt == self.config.max_retries:
          break
        self._count("retries")
        delay = self.config.backoff_s * 2 ** attempt
        if e.retry_after is not None:
          delay = max(delay, e.retry_after)
        self._sleep(min(delay, self.config.max_backoff_s))
        continue
      except ValueError:  # a non-retryable HTTP status
        self._count("failed")
        return None
      self._count("answered")
      path = self._cache_path(key)
      if path is not None:
        with atomic_open(path) as f:
          json.dump({"request": body, "response": raw}, f, ensure_ascii=False)
      return response
    self._count("failed")
    return None

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
    if self.config.api_key_env:
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
