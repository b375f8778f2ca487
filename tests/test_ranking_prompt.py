"""Listwise prompts against hand-written goldens from upstream's rules, and truncation against transformers."""

import pytest

from rrjax import tokenizer as tok_lib
from rrjax.ranking import pointwise
from rrjax.ranking import prompt as P

# Written out from listwise_prompt_r1.toml and the Qwen2.5 chat template, not from rrjax.ranking.prompt.
SYS_REASONING = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their relevance to the query. "
    "Given a query and a passage list, you first thinks about the reasoning process in the mind and then provides "
    "the answer (i.e., the reranked passage list). The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.")
SYS_PLAIN = "You are RankLLM, an intelligent assistant that can rank passages based on their relevance to the query."
HEAD = "<|im_start|>system\n" + SYS_REASONING + "<|im_end|>\n<|im_start|>user\n"
HEAD_PLAIN = "<|im_start|>system\n" + SYS_PLAIN + "<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
RANK_REASONING = ("passages above based on their relevance to the search query. All the passages should be included "
                  "and listed using identifiers, in descending order of relevance. The format of the answer should be "
                  "[] > [], e.g., [2] > [1].")


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load()


def test_brackets_in_query_and_passages(tok):
  got = P.build_prompt("  What does [1] mean in [citation 2] and [23]?  ",
                       ["See [3] and [ 4 ] and [x].", "Array a[10] = [0]."], tok)
  q = "What does (1) mean in [citation 2] and (23)?"
  assert got == (
      HEAD + "I will provide you with 2 passages, each indicated by a numerical identifier []. Rank the passages "
      f"based on their relevance to the search query: {q}.\n\n"
      "[1] See (3) and [ 4 ] and [x].\n"
      "[2] Array a(10) = (0).\n"
      f"Search Query: {q}.\nRank the 2 " + RANK_REASONING + TAIL)
  # Upstream's \d is Unicode-aware.
  assert P.replace_number("[\u0663] [12] [a] [1.5]") == "(\u0663) (12) [a] [1.5]"


def test_html_entities_mojibake_and_quotes(tok):
  passages = [
      "Caf\u00c3\u00a9 &amp; cr\u00c3\u00a8me",    # mojibake and an entity, both repaired per passage
      "x &lt; y",
      "a <b> &amp; c",                            # a '<' turns ftfy's HTML unescaping off
      "\u201cquoted\u201d \u2014 dash",            # curly quotes are uncurled, the em dash stays
      "line one\r\nline two",                      # CRLF -> LF
  ]
  # The query is only fixed by the whole-prompt pass, where '<|im_start|>' has already turned
  # HTML unescaping off: "&amp;" survives, the mojibake and the curly quotes do not.
  got = P.build_prompt("Caf\u00c3\u00a9 &amp; \u201cbar\u201d", passages, tok)
  q = 'Café &amp; "bar"'
  assert got == (
      HEAD + "I will provide you with 5 passages, each indicated by a numerical identifier []. Rank the passages "
      f"based on their relevance to the search query: {q}.\n\n"
      "[1] Café & crème\n"
      "[2] x < y\n"
      "[3] a <b> &amp; c\n"
      '[4] "quoted" \u2014 dash\n'
      "[5] line one\nline two\n"
      f"Search Query: {q}.\nRank the 5 " + RANK_REASONING + TAIL)


def test_titles(tok):
  passages = [
      {"title": "Paris", "text": "Capital of France."},
      {"title": "", "text": "No title."},
      {"title": None, "contents": "None title."},
      {"title": "Ref [5]", "text": "  body [6]  "},   # the title goes on before the strip
      {"title": "  T  ", "text": "x"},
  ]
  got = P.build_prompt("q", passages, tok)
  assert got == (
      HEAD + "I will provide you with 5 passages, each indicated by a numerical identifier []. Rank the passages "
      "based on their relevance to the search query: q.\n\n"
      "[1] Title: Paris Content: Capital of France.\n"
      "[2] No title.\n"
      "[3] None title.\n"
      "[4] Title: Ref (5) Content:   body (6)\n"
      "[5] Title:   T   Content: x\n"
      "Search Query: q.\nRank the 5 " + RANK_REASONING + TAIL)


def test_every_content_field_and_precedence(tok):
  passages = [
      {"text": "T"}, {"segment": "S"}, {"contents": "C"}, {"body": "B"}, {"passage": "P"},
      {"passage": "P", "body": "B", "contents": "C", "segment": "S"},   # segment beats the rest
      {"text": "", "contents": "C"},                                   # present-but-empty text still wins
      "plain string",
  ]
  got = P.build_prompt("q", passages, tok)
  assert got == (
      HEAD + "I will provide you with 8 passages, each indicated by a numerical identifier []. Rank the passages "
      "based on their relevance to the search query: q.\n\n"
      "[1] T\n[2] S\n[3] C\n[4] B\n[5] P\n[6] S\n[7] \n[8] plain string\n"
      "Search Query: q.\nRank the 8 " + RANK_REASONING + TAIL)


def test_truncation(tok):
  passages = [
      "  The quick brown fox jumps over the lazy dog.",
      "alpha [12] beta",         # cut inside the brackets: "[1" is not an identifier
      "alpha [12] beta gamma",   # cut after them: replaced after truncation
      "short",
  ]
  got = [P.passage_content(p, tok, n) for p, n in zip(passages, (5, 3, 5, 5))]
  assert got == ["The quick brown fox jumps", "alpha [1", "alpha (12)", "short"]
  got = P.build_prompt("q", passages[:1], tok, max_passage_tokens=3)
  assert "\n[1] The quick brown\nSearch Query: q.\n" in got


def test_unicode(tok):
  passages = [
      "日本語のテキスト 😀",
      "\uff26\uff55\uff4c\uff4c \uff57\uff49\uff44\uff54\uff48",   # fullwidth -> ASCII
      "e\u0301t\u00e9",                                               # NFC
      "龘 dragon",
  ]
  got = P.build_prompt("ünïcödé?", passages, tok)
  assert got == (
      HEAD + "I will provide you with 4 passages, each indicated by a numerical identifier []. Rank the passages "
      "based on their relevance to the search query: ünïcödé?.\n\n"
      "[1] 日本語のテキスト 😀\n[2] Full width\n[3] \u00e9t\u00e9\n[4] 龘 dragon\n"
      "Search Query: ünïcödé?.\nRank the 4 " + RANK_REASONING + TAIL)
  # One token is half of '龘': the byte-level decoder gives U+FFFD, as transformers does.
  assert P.passage_content("龘 dragon", tok, 1) == "\ufffd"


def test_window_of_one_plain_mode(tok):
  got = P.build_prompt("q [7]", [{"body": "only [1] passage"}], tok, mode="plain")
  assert got == (
      HEAD_PLAIN + "I will provide you with 1 passages, each indicated by a numerical identifier []. Rank the "
      "passages based on their relevance to the search query: q (7).\n\n"
      "[1] only (1) passage\n"
      "Search Query: q (7).\nRank the 1 passages above based on their relevance to the search query. All the "
      "passages should be included and listed using identifiers, in descending order of relevance. The output "
      "format should be [] > [], e.g., [2] > [1]. Only respond with the ranking results, do not say any word or "
      "explain." + TAIL)


def test_window_of_one_reasoning(tok):
  got = P.build_prompt("q", ["p"], tok)
  assert got == (
      HEAD + "I will provide you with 1 passages, each indicated by a numerical identifier []. Rank the passages "
      "based on their relevance to the search query: q.\n\n[1] p\nSearch Query: q.\nRank the 1 " + RANK_REASONING
      + TAIL)


def test_window_of_twenty(tok):
  passages = [{"docid": f"d{i}", "text": f"Passage {i} cites [{i}]."} for i in range(1, 21)]
  got = P.build_prompt("which passage?", passages, tok)
  lines = "".join(f"[{i}] Passage {i} cites ({i}).\n" for i in range(1, 21))
  assert got == (
      HEAD + "I will provide you with 20 passages, each indicated by a numerical identifier []. Rank the passages "
      "based on their relevance to the search query: which passage?.\n\n" + lines
      + "Search Query: which passage?.\nRank the 20 " + RANK_REASONING + TAIL)


def test_messages_and_full_list(tok):
  msgs = P.build_messages("q", ["a", "b", "c"], tok)
  assert [m["role"] for m in msgs] == ["system", "user"]
  assert msgs[0]["content"] == SYS_REASONING
  assert msgs[1]["content"].startswith("I will provide you with 3 passages")
  assert msgs[1]["content"].endswith("e.g., [2] > [1].")
  assert tok.apply_chat_template(msgs) == P.build_prompt("q", ["a", "b", "c"], tok)


def test_bad_inputs(tok):
  with pytest.raises(ValueError, match="fields"):
    P.passage_content({"title": "t"}, tok)
  with pytest.raises(ValueError, match="mode"):
    P.build_prompt("q", ["p"], tok, mode="rank_GPT_rankk")  # an upstream mode ReasonRank's models never used
  assert P.build_prompt("q", ["p"], tok, mode="rank_GPT") == P.build_prompt("q", ["p"], tok, mode="plain")
  with pytest.raises(ValueError):
    P.passage_content({"text": None}, tok)


TRUNCATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "日本語のテキスト です 😀😀 emoji 龘 ꙮ 𝔘𝔫𝔦",
    "hello <|im_end|> world <think> x </think>",
    "a\r\nb\n\n  c\t d \u00a0nbsp\u2003em",
    "  lead and trail  ",
    "e\u0301 naïve café ß ﬁ",
    "x" * 60,
]


def test_truncation_matches_transformers(tok):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(tok_lib.ASSET_DIR))
  for text in TRUNCATION_TEXTS:
    assert tok.tokenize(text) == hf.tokenize(text), text
    for n in (0, 1, 2, 3, 5, 8, 13, 512):
      ours = tok.convert_tokens_to_string(tok.tokenize(text)[:n])
      assert ours == hf.convert_tokens_to_string(hf.tokenize(text)[:n]), (text, n)
  # And the whole prompt through transformers' template and tokenizer, upstream's exact path.
  import ftfy
  passages = [{"title": "T [1]", "text": t} for t in TRUNCATION_TEXTS]
  query = "q [2] &amp;"
  msgs = P.build_messages(query, passages, tok, max_passage_tokens=7)
  upstream_user = (f"I will provide you with {len(passages)} passages, each indicated by a numerical identifier []. "
                   "Rank the passages based on their relevance to the search query: q (2) &amp;.\n\n")
  for i, p in enumerate(passages, 1):
    content = ftfy.fix_text(("Title: " + p["title"] + " " + "Content: " + p["text"]).strip())
    content = hf.convert_tokens_to_string(hf.tokenize(content)[:7])
    upstream_user += f"[{i}] {P.replace_number(content)}\n"
  upstream_user += f"Search Query: q (2) &amp;.\nRank the {len(passages)} " + RANK_REASONING
  assert msgs[1]["content"] == upstream_user
  upstream = ftfy.fix_text(hf.apply_chat_template(
      [{"role": "system", "content": SYS_REASONING}, {"role": "user", "content": upstream_user}],
      tokenize=False, add_generation_prompt=True))
  assert P.build_prompt(query, passages, tok, max_passage_tokens=7) == upstream
  assert P.build_prompt(query, passages, hf, max_passage_tokens=7) == upstream


def test_rank1(tok):
  assert pointwise.rank1_prompt("what is x?", "x is y.") == (
      "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
      "Query: what is x?\nPassage: x is y.\n<think>")
  true_id, false_id = pointwise.rank1_label_ids(tok)
  assert (true_id, false_id) == (830, 895)
  assert tok.decode([true_id]) == " true" and tok.decode([false_id]) == " false"


# ---------------------------------------------------------------- the one passage rule vs its former copies
# Verbatim copies of the four implementations the rule replaced (listwise prompt, Rank1, trec reader, teachers).


def _old_listwise(passage, tokenizer, max_tokens=512):
  import ftfy
  if max_tokens is not None and max_tokens < 0:
    raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
  doc = {"text": passage} if isinstance(passage, str) else passage
  field = next((f for f in P.CONTENT_FIELDS if f in doc), None)
  if field is None:
    raise ValueError("fields")
  content = doc[field]
  if not isinstance(content, str):
    raise ValueError("type")
  if doc.get("title"):
    if not isinstance(doc["title"], str):
      raise ValueError("title type")
    content = "Title: " + doc["title"] + " " + "Content: " + content
  content = ftfy.fix_text(content.strip())
  content = tokenizer.convert_tokens_to_string(tokenizer.tokenize(content)[:max_tokens])
  return P.replace_number(content)


def _old_rank1(doc, tokenizer, max_tokens=512):
  import ftfy
  doc = {"text": doc} if isinstance(doc, str) else doc
  field = next((f for f in P.CONTENT_FIELDS if f in doc), None)
  if field is None:
    raise ValueError("fields")
  content = str(doc[field])
  if doc.get("title"):
    content = "Title: " + str(doc["title"]) + " " + "Content: " + content
  content = ftfy.fix_text(content.strip())
  return tokenizer.convert_tokens_to_string(tokenizer.tokenize(content)[:max_tokens])


def _old_trec_doc_content(doc):
  content = next((doc[f] for f in ("text", "segment", "contents", "body", "passage") if f in doc), None)
  if content is None:
    raise KeyError("fields")
  if doc.get("title"):
    content = "Title: " + doc["title"] + " " + "Content: " + content
  return content


def _old_teacher_plain(passage):
  if isinstance(passage, str):
    return passage
  text = next((passage[f] for f in ("text", "segment", "contents", "body", "passage") if f in passage), "")
  return f"Title: {passage['title']} Content: {text}" if passage.get("title") else text


PASSAGES = [
    "plain [3] string",
    "  \n\t lead and trail [12]  ",
    {"title": "Ref [1]", "text": "  body [3]  "},
    {"title": "", "text": "no title"},
    {"title": None, "segment": "None title"},
    {"title": "  T  ", "body": "x"},
    {"passage": "only the passage field [2]"},
    {"passage": "P", "body": "B", "contents": "C"},
    {"text": "", "contents": "present-but-empty text wins"},
    {"title": "cafÃ©", "text": "Ã©tÃ© â€” it&amp;s [4] done"},   # mojibake and an entity for ftfy
    {"text": "e\u0301t\u00e9 \uff26\uff55\uff4c\uff4c 龘 dragon"},
    {"docid": "d1", "title": "Long", "text": "The quick brown fox jumps over the lazy dog. " * 4},
]
MALFORMED = [{"title": "t"}, {"docid": "x"}, {"text": None}, {"text": 5}, {"title": 7, "text": "x"},
             {"title": ["a"], "contents": "y"}]


def test_rule_matches_every_former_copy(tok):
  from rrjax.ranking import pointwise
  for p in PASSAGES:
    for n in (None, 0, 1, 7, 512):
      assert P.passage_content(p, tok, n) == _old_listwise(p, tok, n), (p, n)
      assert pointwise.rank1_passage(p, tok, n) == _old_rank1(p, tok, n), (p, n)
    if not isinstance(p, str):
      assert P.titled_content(p) == _old_trec_doc_content(p), p
    assert P.titled_content(p) == _old_teacher_plain(p), p
  assert P.passage_content(PASSAGES[0], tok) == "plain (3) string"
  assert pointwise.rank1_passage(PASSAGES[0], tok) == "plain [3] string"
  assert P.titled_content(PASSAGES[9]) == "Title: cafÃ© Content: Ã©tÃ© â€” it&amp;s [4] done"
  assert P.passage_content(PASSAGES[9], tok) == "Title: café Content: été — it&s (4) done"


def test_rule_rejects_what_the_listwise_copy_rejected(tok):
  # Where the copies disagreed (Rank1 and the teachers coerced or defaulted), the rule keeps the listwise
  # prompt's checks: a passage needs a content field, and content and title must be strings.
  from rrjax.ranking import pointwise
  for p in MALFORMED:
    with pytest.raises(ValueError):
      _old_listwise(p, tok)
    for rule in (P.titled_content, lambda d: P.passage_content(d, tok), lambda d: pointwise.rank1_passage(d, tok)):
      with pytest.raises(ValueError):
        rule(p)
  with pytest.raises(ValueError, match="max_tokens"):
    pointwise.rank1_passage("p", tok, -1)


# ---- rank_GPT_qwen3 (ReasonRank-8B), written out from upstream at 06721fd: listwise_prompt_r1.toml:1 (the short
# system prompt), utils.py:62-63 (prefix), utils.py:78-80 (post-prompt), rank_listwise_os_llm.py:191-220 (assembly).

QWEN3_POST = ("passages above based on their relevance to the search query. All the passages should be included and "
              "listed using identifiers, in descending order of relevance. The final ranked list should be enclosed "
              "within <answer> </answer> tags, i.e., <answer> ranked list here </answer>. The format of ranked list "
              "should be [] > [], e.g., [2] > [1]. Only respond with the ranking results, do not say any word or "
              "explain.")


@pytest.fixture(scope="module")
def qwen3_tok():
  return tok_lib.load(model_type="qwen3")


def _upstream_qwen3(query, contents):
  """upstream create_prompt for rank_GPT_qwen3, given the passages' contents as convert_doc_to_prompt_content
  returns them, through the Qwen3 chat template as written in the issue (thinking on: nothing after the header)."""
  import ftfy
  query = P.replace_number(query).strip()
  user = (f"I will provide you with {len(contents)} passages, each indicated by a numerical identifier []. "
          f"Rank the passages based on their relevance to the search query: {query}.\n" + "\n")
  user += "".join(f"[{i}] {c}\n" for i, c in enumerate(contents, 1))
  user += f"Search Query: {query}.\nRank the {len(contents)} " + QWEN3_POST
  return ftfy.fix_text(HEAD_PLAIN + user + TAIL)


@pytest.mark.parametrize("mode", ["qwen3", "rank_GPT_qwen3"])
def test_qwen3_brackets_non_ascii_and_short_window(qwen3_tok, mode):
  passages = ["See [3] and [ 4 ] — naïve café [12].", {"title": "日本 [1]", "text": "テキスト 😀 <think> x"},
              "Caf\u00c3\u00a9 &amp; cr\u00c3\u00a8me"]
  got = P.build_prompt("  Is [1] in [citation 2] ünïcödé [23]?  ", passages, qwen3_tok, mode=mode)
  assert got == _upstream_qwen3("  Is [1] in [citation 2] ünïcödé [23]?  ", [
      "See (3) and [ 4 ] — naïve café (12).", "Title: 日本 (1) Content: テキスト 😀 <think> x", "Café & crème"])
  assert got.startswith("<|im_start|>system\nYou are RankLLM, an intelligent assistant that can rank passages "
                        "based on their relevance to the query.<|im_end|>\n<|im_start|>user\nI will provide you "
                        "with 3 passages")
  assert "query: Is (1) in [citation 2] ünïcödé (23)?.\n\n[1] See (3)" in got
  assert got.endswith("do not say any word or explain.<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_window_of_twenty_and_token_ids(qwen3_tok):
  transformers = pytest.importorskip("transformers")
  import ftfy
  hf = transformers.AutoTokenizer.from_pretrained(str(tok_lib.QWEN3_ASSET_DIR))
  passages = [{"docid": f"d{i}", "text": f"Passage {i} cites [{i}] and </think>."} for i in range(1, 21)]
  got = P.build_prompt("which passage?", passages, qwen3_tok, mode="qwen3")
  assert got == _upstream_qwen3("which passage?", [f"Passage {i} cites ({i}) and </think>." for i in range(1, 21)])
  # transformers' own template and tokenizer on upstream's messages give the same text and the same ids.
  msgs = P.build_messages("which passage?", passages, qwen3_tok, mode="qwen3")
  assert msgs[0]["content"] == SYS_PLAIN
  assert ftfy.fix_text(hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)) == got
  ids = qwen3_tok.encode(got)
  assert ids == hf(got, add_special_tokens=False)["input_ids"]
  assert ids[-3:] == [151644, 77091, 198] and ids.count(151668) == 20  # `</think>` is one Qwen3 token


def test_qwen3_passages_cut_with_the_qwen3_tokenizer(qwen3_tok, tok):
  text = "<think> " * 6 + "tail words"
  assert P.passage_content(text, qwen3_tok, 4) == "<think> <think> "  # <think>, " ", <think>, " "
  assert P.passage_content(text, tok, 4) == "<think> <"  # Qwen2.5 spells <think> in three tokens
