"""ReasonRank's listwise prompt, byte for byte as upstream `create_prompt` builds it, and the one passage rule
(`titled_content`, `passage_content`) that Rank1, the data readers and the teachers share.

Upstream (8421BCD/ReasonRank): listwise_prompt_r1.toml (system prompts), utils.py (add_prefix_prompt,
add_post_prompt, convert_doc_to_prompt_content) and rerank/rank_listwise_os_llm.py (create_prompt).
See UPSTREAM.md. mode="reasoning" is upstream's prompt_mode rank_GPT_reasoning (ReasonRank-7B/32B),
mode="plain" is rank_GPT, mode="qwen3" is rank_GPT_qwen3 (ReasonRank-8B, on Qwen3-8B, which opens its own
`<think>`): the short system prompt, the same prefix, and a post-prompt that asks for `<answer>` tags. Upstream's
names are accepted too (`prompt_mode`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import ftfy

SYSTEM_PROMPT = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their relevance to the query.")
# The typo "you first thinks" is upstream's and the released models were trained on it.
SYSTEM_PROMPT_REASONING = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their relevance to the query. "
    "Given a query and a passage list, you first thinks about the reasoning process in the mind and then "
    "provides the answer (i.e., the reranked passage list). The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.")
PROMPT_MODES = ("reasoning", "plain", "qwen3")
# upstream's --prompt_mode values -> ours
UPSTREAM_MODES = {"rank_GPT_reasoning": "reasoning", "rank_GPT": "plain", "rank_GPT_qwen3": "qwen3"}
# Upstream's field precedence in convert_doc_to_prompt_content ("passage" is its last resort); the corpus readers
# pick the text field by it too.
CONTENT_FIELDS = ("text", "segment", "contents", "body", "passage")

Passage = str | Mapping[str, Any]


def prompt_mode(name: str) -> str:
  """Our mode name for ours or upstream's (`rank_GPT_qwen3` -> "qwen3"); ValueError naming both lists."""
  mode = UPSTREAM_MODES.get(name, name)
  if mode not in PROMPT_MODES:
    raise ValueError(f"prompt mode must be one of {PROMPT_MODES} or upstream's {tuple(UPSTREAM_MODES)}, got {name!r}")
  return mode


def replace_number(s: str) -> str:
  """`[12]` -> `(12)`, so passages and the query cannot fake an identifier."""
  return re.sub(r"\[(\d+)\]", r"(\1)", s)


def system_prompt(mode: str = "reasoning") -> str:
  """listwise_prompt_r1.toml: system_prompt_reasoning for rank_GPT_reasoning, system_prompt for the others."""
  mode = prompt_mode(mode)
  return SYSTEM_PROMPT_REASONING if mode == "reasoning" else SYSTEM_PROMPT


def prefix_prompt(query: str, num: int) -> str:
  """Upstream add_prefix_prompt (the same text for rank_GPT, rank_GPT_qwen3 and rank_GPT_reasoning)."""
  return (f"I will provide you with {num} passages, each indicated by a numerical identifier []. "
          f"Rank the passages based on their relevance to the search query: {query}.\n")


def post_prompt(query: str, num: int, mode: str = "reasoning") -> str:
  """Upstream add_post_prompt."""
  mode = prompt_mode(mode)
  head = (f"Search Query: {query}.\nRank the {num} passages above based on their relevance to the search query. "
          "All the passages should be included and listed using identifiers, in descending order of relevance. ")
  if mode == "reasoning":
    return head + "The format of the answer should be [] > [], e.g., [2] > [1]."
  only = "Only respond with the ranking results, do not say any word or explain."
  if mode == "qwen3":
    return (head + "The final ranked list should be enclosed within <answer> </answer> tags, i.e., <answer> ranked "
            "list here </answer>. The format of ranked list should be [] > [], e.g., [2] > [1]. " + only)
  return head + "The output format should be [] > [], e.g., [2] > [1]. " + only


def titled_content(passage: Passage) -> str:
  """A passage's raw text: its first CONTENT_FIELDS field, after `Title: {title} Content: ` when the title is
  truthy (no strip, ftfy or truncation yet). A plain string is the passage text."""
  doc = {"text": passage} if isinstance(passage, str) else passage
  field = next((f for f in CONTENT_FIELDS if f in doc), None)
  if field is None:
    raise ValueError(f"passage has none of the fields {CONTENT_FIELDS}: keys {sorted(doc)}")
  content = doc[field]
  if not isinstance(content, str):
    raise ValueError(f"passage field {field!r} must be a string, got {type(content).__name__}")
  if doc.get("title"):
    if not isinstance(doc["title"], str):
      raise ValueError(f"passage title must be a string, got {type(doc['title']).__name__}")
    content = "Title: " + doc["title"] + " " + "Content: " + content
  return content


def passage_content(passage: Passage, tokenizer, max_tokens: int | None = 512, *, replace_numbers: bool = True) -> str:
  """Upstream convert_doc_to_prompt_content with truncate_by_word=False.

  Order: titled_content, strip, ftfy.fix_text, keep the first `max_tokens` tokens, then replace `[n]`
  (Rank1 passes replace_numbers=False: its prompt has no identifiers to fake).
  """
  if max_tokens is not None and max_tokens < 0:
    raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
  content = ftfy.fix_text(titled_content(passage).strip())
  # Upstream always round-trips through the tokenizer, even when nothing is cut (it NFC-normalizes).
  content = tokenizer.convert_tokens_to_string(tokenizer.tokenize(content)[:max_tokens])
  return replace_number(content) if replace_numbers else content


def user_message(query: str, passages: Sequence[Passage], tokenizer, *, max_passage_tokens: int | None = 512,
                 mode: str = "reasoning") -> str:
  """The user turn: prefix, a blank line, `[i] content` lines, the post-prompt (no trailing newline)."""
  query = replace_number(query).strip()
  num = len(passages)
  parts = [prefix_prompt(query, num), "\n"]
  for rank, passage in enumerate(passages, start=1):
    parts.append(f"[{rank}] {passage_content(passage, tokenizer, max_passage_tokens)}\n")
  parts.append(post_prompt(query, num, mode))
  return "".join(parts)


def build_messages(query: str, passages: Sequence[Passage], tokenizer, *, max_passage_tokens: int | None = 512,
                   mode: str = "reasoning") -> list[dict[str, str]]:
  """System and user chat messages, before the chat template and the final fix_text."""
  return [
      {"role": "system", "content": system_prompt(mode)},
      {"role": "user", "content": user_message(
          query, passages, tokenizer, max_passage_tokens=max_passage_tokens, mode=mode)},
  ]


def build_prompt(query: str, passages: Sequence[Passage], tokenizer, *, max_passage_tokens: int | None = 512,
                 mode: str = "reasoning") -> str:
  """The model input text: chat template with the generation prompt, then ftfy over the whole of it."""
  messages = build_messages(query, passages, tokenizer, max_passage_tokens=max_passage_tokens, mode=mode)
  # tokenize=False spelled out so a transformers tokenizer works here too.
  return ftfy.fix_text(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
