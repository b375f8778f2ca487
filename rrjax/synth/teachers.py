"""Teachers label data: stage 1 judges single passages (pointwise positives), stage 2 ranks a window
with a reasoning chain. Three implementations share the `Teacher` protocol:

- `ChatTeacher`: any OpenAI-compatible endpoint (rrjax.synth.client). Stage 2 uses upstream's
  RankGPT-style multi-turn labelling prompt (8421BCD/ReasonRank rerank/rank_gpt.py
  `_get_prefix_for_rank_gpt_prompt` / `_get_suffix_for_rank_gpt_prompt`: the DeepSeek-R1 variant without
  a system turn when "deepseek" is in the model name, else a system turn; one user turn per passage
  answered "Received passage [i]."). The reasoning chain is the server's separate `reasoning_content`
  (DeepSeek-R1) or `<think>...</think>` in the content. Upstream ships no stage-1 prompt, so the
  pointwise prompt is rrjax's own, worded after Rank1's. A reference answer, when given, is added to
  both prompts (rrjax's addition; upstream's text has no slot for it).
- `LocalTeacher`: an rrjax model through `rrjax.generate` (Rank1 prompt for stage 1, ReasonRank's
  listwise prompt for stage 2).
- `ProgrammaticTeacher`: reads the synthetic task's text (rrjax.synth.task) and computes the answer,
  writing one comparison per passage as its reasoning.

Answers that cannot be read are counted in `teacher.stats` and come back as None.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

from rrjax import tokenizer as tokenizer_lib
from rrjax.ranking.parse import answer_span, parse_permutation_with_source
from rrjax.ranking.prompt import Passage, passage_content, titled_content
from rrjax.synth import task as task_lib


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
  """Stage 1: is this passage relevant to the query?"""

  query: str
  passage: Passage
  answer: str | None = None


@dataclasses.dataclass(frozen=True)
class RankRequest:
  """Stage 2: rank these passages (a window of at most 20, in first-stage order)."""

  query: str
  passages: tuple[Passage, ...]
  answer: str | None = None


@dataclasses.dataclass(frozen=True)
class RankResult:
  reasoning: str
  permutation: tuple[int, ...]  # 0-based window positions, best first, a full permutation


class Teacher(Protocol):
  name: str
  stats: dict[str, int]

  def judge(self, requests: Sequence[JudgeRequest]) -> list[bool | None]: ...

  def rank(self, requests: Sequence[RankRequest]) -> list[RankResult | None]: ...


def _new_stats() -> dict[str, int]:
  return {"judged": 0, "ranked": 0, "malformed_judge": 0, "malformed_rank": 0}


# ---------------------------------------------------------------- prompts and parsing

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_VERDICT = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def split_reasoning(content: str, reasoning: str | None = None) -> tuple[str, str]:
  """(reasoning, final text): the separate reasoning field wins, else `<think>...</think>` in content."""
  if reasoning:
    return reasoning.strip(), _THINK.sub("", content)
  match = _THINK.search(content)
  if match:
    return match.group(1).strip(), content[match.end():]
  if "</think>" in content:  # templates that put <think> in the prompt
    head, _, tail = content.partition("</think>")
    return head.strip(), tail
  return "", content


def parse_verdict(text: str) -> bool | None:
  """The last standalone true/false after any reasoning; None if there is none."""
  found = _VERDICT.findall(split_reasoning(text)[1])
  return found[-1].lower() == "true" if found else None


def parse_ranking(text: str, n: int) -> tuple[int, ...] | None:
  """A full 0-based permutation (missing ids appended in window order, as upstream does); None when
  the text names no valid id."""
  span, _ = answer_span(text)
  perm, source = parse_permutation_with_source(text, n)
  ids = [int(x) - 1 for x in re.findall(r"\d+", span) if len(x) < 6]
  if source == "unparsable" or not any(0 <= i < n for i in ids):
    return None
  return tuple(perm)


def pointwise_messages(query: str, passage: str, answer: str | None = None) -> list[dict[str, str]]:
  """rrjax's stage-1 prompt (after Rank1's wording)."""
  lines = ["Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.",
           f"Query: {query}"]
  if answer:
    lines.append(f"Reference answer: {answer}")
  lines.append(f"Passage: {passage}")
  return [{"role": "user", "content": "\n".join(lines)}]


def rankgpt_messages(query: str, passages: Sequence[str], model: str, answer: str | None = None) -> list[dict[str, str]]:
  """Upstream's RankGPT labelling conversation for `passages` (already converted to prompt content)."""
  num = len(passages)
  intro = (f"I will provide you with {num} passages, each indicated by number identifier []. \n"
           f"Rank the passages based on their relevance to query: {query}.")
  if answer:
    intro += f"\nReference answer to the query: {answer}"
  assistant = "You are an intelligent assistant that can rank passages based on their relevance to the query."
  if "deepseek" in model:  # R1 takes no system turn
    messages = [{"role": "user", "content": f"{assistant} {intro}"}]
  else:
    messages = [{"role": "system", "content": assistant}, {"role": "user", "content": intro}]
  messages.append({"role": "assistant", "content": "Okay, please provide the passages."})
  for rank, content in enumerate(passages, 1):
    messages.append({"role": "user", "content": f"[{rank}] {content}"})
    messages.append({"role": "assistant", "content": f"Received passage [{rank}]."})
  messages.append({"role": "user", "content": (
      f"Search Query: {query}. \nRank the {num} passages above based on their relevance to the search query. "
      "The passages should be listed in descending order using identifiers. The most relevant passages should be "
      "listed first. The output format should be [] > [], e.g., [2] > [1]. Only response the ranking results, "
      "do not say any word or explain.")})
  return messages


# ---------------------------------------------------------------- teachers


class ChatTeacher:
  """A teacher behind an OpenAI-compatible endpoint (see rrjax.synth.client)."""

  def __init__(self, client, tokenizer=None, max_passage_tokens: int | None = 512, require_reasoning: bool = True):
    self.client = client
    self.name = f"chat:{client.config.model}"
    self.stats = _new_stats()
    self.max_passage_tokens = max_passage_tokens
    self.require_reasoning = require_reasoning
    self._tokenizer = tokenizer

  @property
  def tokenizer(self):
    self._tokenizer = tokenizer_lib.or_bundled(self._tokenizer)
    return self._tokenizer

  def judge(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
    answers = self.client.complete_many([pointwise_messages(
        r.query, passage_content(r.passage, self.tokenizer, self.max_passage_tokens), r.answer) for r in requests])
    out = []
    for a in answers:
      verdict = None if a is None else parse_verdict(a.content)
      self.stats["judged" if verdict is not None else "malformed_judge"] += 1
      out.append(verdict)
    return out

  def rank(self, requests: Sequence[RankRequest]) -> list[RankResult | None]:
    conversations = [rankgpt_messages(
        r.query, [passage_content(p, self.tokenizer, self.max_passage_tokens) for p in r.passages],
        self.client.config.model, r.answer) for r in requests]
    out = []
    for r, a in zip(requests, self.client.complete_many(conversations)):
      result = None
      if a is not None:
        reasoning, final = split_reasoning(a.content, a.reasoning)
        perm = parse_ranking(final, len(r.passages))
        if perm is not None and (reasoning or not self.require_reasoning):
          result = RankResult(reasoning, perm)
      self.stats["ranked" if result is not None else "malformed_rank"] += 1
      out.append(result)
    return out


class LocalTeacher:
  """An rrjax model as teacher, decoding with rrjax.generate."""

  def __init__(self, model, tokenizer, max_new_tokens: int = 3172, temperature: float = 0.0,
               max_passage_tokens: int | None = 512, batch_size: int | None = None):
    self.model, self.tokenizer = model, tokenizer
    self.name = "local"
    self.stats = _new_stats()
    self.max_new_tokens, self.temperature = max_new_tokens, temperature
    self.max_passage_tokens, self.batch_size = max_passage_tokens, batch_size

  def _generate(self, prompts: Sequence[str]) -> list[str]:
    from rrjax import decode
    out = decode.generate(self.model, [self.tokenizer.encode(p) for p in prompts], max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, engine=decode.EngineConfig(slots=self.batch_size or 0))
    return [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]

  def judge(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
    from rrjax.ranking.pointwise import rank1_prompt
    texts = self._generate([rank1_prompt(r.query, titled_content(r.passage)) for r in requests])
    out = []
    for text in texts:
      # The prompt opened <think>; the verdict follows </think>.
      verdict = parse_verdict(text.partition("</think>")[2] if "</think>" in text else text)
      self.stats["judged" if verdict is not None else "malformed_judge"] += 1
      out.append(verdict)
    return out

  def rank(self, requests: Sequence[RankRequest]) -> list[RankResult | None]:
    from rrjax.ranking.prompt import build_prompt
    prompts = [build_prompt(r.query, list(r.passages), self.tokenizer, max_passage_tokens=self.max_passage_tokens)
               for r in requests]
    out = []
    for r, text in zip(requests, self._generate(prompts)):
      reasoning, final = split_reasoning(text)
      perm = parse_ranking(final, len(r.passages)) if reasoning else None
      result = RankResult(reasoning, perm) if perm is not None else None
      self.stats["ranked" if result is not None else "malformed_rank"] += 1
      out.append(result)
    return out


class ProgrammaticTeacher:
  """Solves the synthetic task from its text: one comparison per passage, relevant passages first.

  Reasoning: `Relevant if cost < 7. [1] 5<7 yes. [2] 9<7 no. ...` (the condition, then per passage its
  value, the query's operator and threshold, and the verdict). Ranking: relevant passages, then the rest,
  each group in window order.
  """

  name = "programmatic"

  def __init__(self):
    self.stats = _new_stats()

  @staticmethod
  def _condition(query: str) -> tuple[str, int] | None:
    m = task_lib.QUERY_RE.match(query.strip())
    return (m.group(1), int(m.group(2))) if m else None

  @staticmethod
  def _value(passage: Passage) -> int | None:
    try:
      text = titled_content(passage)
    except ValueError:  # no string text field: not a task passage, so unreadable like any other
      return None
    m = task_lib.PASSAGE_RE.match(text.strip())
    return int(m.group(2)) if m else None

  def judge(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
    out = []
    for r in requests:
      cond, value = self._condition(r.query), self._value(r.passage)
      verdict = None if cond is None or value is None else task_lib.is_relevant(cond[0], value, cond[1])
      self.stats["judged" if verdict is not None else "malformed_judge"] += 1
      out.append(verdict)
    return out

  def rank(self, requests: Sequence[RankRequest]) -> list[RankResult | None]:
    out = []
    for r in requests:
      cond, values = self._condition(r.query), [self._value(p) for p in r.passages]
      if cond is None or any(v is None for v in values) or not values:
        self.stats["malformed_rank"] += 1
        out.append(None)
        continue
      op, t = cond
      symbol = "<" if op == "less" else ">"
      verdicts = [task_lib.is_relevant(op, v, t) for v in values]
      # The condition first, then one comparison per passage (the small demo model copies the operator
      # from just before rather than from the far-away query).
      reasoning = f"Relevant if cost {symbol} {t}. " + " ".join(
          f"[{i}] {v}{symbol}{t} {'yes' if ok else 'no'}." for i, (v, ok) in enumerate(zip(values, verdicts), 1))
      perm = [i for i, ok in enumerate(verdicts) if ok] + [i for i, ok in enumerate(verdicts) if not ok]
      self.stats["ranked"] += 1
      out.append(RankResult(reasoning, tuple(perm)))
    return out
