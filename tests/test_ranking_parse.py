"""The output parser: one hand case per upstream rule and fallback, then fuzzing."""

from hypothesis import given, settings
from hypothesis import strategies as st

from rrjax.ranking.parse import SOURCES, answer_ids, clean_response, parse_permutation, parse_permutation_with_source


def test_regex_hit_ignores_digits_in_reasoning():
  text = "<think>Passage [1] mentions 1999 and [3] is best.</think>\n<answer>[3] > [1] > [2]</answer>"
  assert parse_permutation_with_source(text, 4) == ([2, 0, 1, 3], "answer_tag")


def test_uppercase_tags_match_on_the_lowercased_text():
  text = "<THINK>reason 4</THINK> <Answer>[2] > [1]</ANSWER>"
  assert parse_permutation_with_source(text, 3) == ([1, 0, 2], "answer_tag")


def test_first_answer_after_the_first_think():
  # The non-greedy regex takes the first think/answer pair.
  text = "<think>a</think><answer>[2] > [1]</answer> junk <think>b</think><answer>[1] > [2]</answer>"
  assert parse_permutation_with_source(text, 2) == ([1, 0], "answer_tag")


def test_only_answer_tag_uses_text_after_the_last_one():
  # No </think>: the regex fails; the last "<answer>" wins, "</answer>" and later text are read too.
  text = "reasoning [5] <answer>[1] > [2]</answer> then <answer>[3] > [2]</answer> ps [4]"
  assert parse_permutation_with_source(text, 5) == ([2, 1, 3, 0, 4], "last_answer")


def test_last_answer_fallback_is_case_sensitive():
  text = "thinking 3 <ANSWER>[2] > [1]"
  assert parse_permutation_with_source(text, 3) == ([2, 1, 0], "whole_text")


def test_truncated_reasoning_without_tags_reads_the_whole_text():
  text = "<think>Passage [4] is about cats, [2] about dogs"
  assert parse_permutation_with_source(text, 4) == ([3, 1, 0, 2], "whole_text")


def test_no_tags_plain_ranking():
  assert parse_permutation_with_source("[3] > [1] > [2]", 3) == ([2, 0, 1], "whole_text")


def test_duplicates_first_occurrence_wins():
  text = "<think></think><answer>[2] > [3] > [2] > [1] > [3]</answer>"
  assert parse_permutation(text, 4) == [1, 2, 0, 3]


def test_zero_and_out_of_range_are_dropped():
  text = "<think>x</think><answer>[0] > [7] > [3] > [21] > [1]</answer>"
  assert parse_permutation(text, 5) == [2, 0, 1, 3, 4]


def test_missing_ids_appended_in_window_order():
  assert parse_permutation("<think></think><answer>[5]</answer>", 6) == [4, 0, 1, 2, 3, 5]
  assert parse_permutation("no digits at all", 3) == [0, 1, 2]
  assert parse_permutation("", 0) == []


def test_adjacent_digits_form_one_number():
  # Upstream keeps only digits, so "[1][2]" reads as 1 and 2 but "12" is twelve.
  assert parse_permutation("<think></think><answer>[1][2] 3-4</answer>", 4) == [0, 1, 2, 3]
  assert parse_permutation("<think></think><answer>12</answer>", 13) == [11] + list(range(11)) + [12]


def test_unicode_decimal_digits_are_numbers():
  # '٣' (Arabic-Indic three) and '３' (fullwidth) are str.isdigit() and int() reads them.
  text = "<think></think><answer>[\u0663] > [\uff12] > [1]</answer>"
  assert parse_permutation_with_source(text, 3) == ([2, 1, 0], "answer_tag")


def test_digits_int_rejects_leave_the_window_unchanged():
  # '²' is str.isdigit() but int('²') raises: upstream prints "unexcepted output!" and keeps the order.
  text = "<think></think><answer>[3] > [2] > [1]\u00b2</answer>"
  assert parse_permutation_with_source(text, 3) == ([0, 1, 2], "unparsable")
  # Python refuses int() of more than 4300 digits the same way.
  assert parse_permutation_with_source("[2] " + "9" * 5000, 3) == ([0, 1, 2], "unparsable")


def test_non_digit_unicode_numerals_are_separators():
  # 'Ⅻ' and '½' are numeric but not digits: they split like any other character.
  assert parse_permutation("[2]Ⅻ[1]½[3]", 3) == [1, 0, 2]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80), st.integers(0, 30))
def test_fuzz_any_text_is_a_permutation(text, n):
  perm, source = parse_permutation_with_source(text, n)
  assert sorted(perm) == list(range(n))
  assert source in SOURCES


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "[", "]", " > ",
                                 "1", "2", "3", "0", "17", "\u00b2", "\u0663", "\n", "x"]), max_size=30),
       st.integers(0, 20))
def test_fuzz_tag_soup_is_a_permutation(parts, n):
  perm, source = parse_permutation_with_source("".join(parts), n)
  assert sorted(perm) == list(range(n))
  assert source in SOURCES


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet=st.characters(codec="ascii"), max_size=60),
                 st.text(alphabet=st.characters(codec="utf-8"), max_size=60)))
def test_answer_ids_fast_path_is_clean_response(text):
  # The parser and the reward read ids through answer_ids; its ASCII regex must be upstream's rule.
  assert answer_ids(text) == clean_response(text).split()


def test_qwen3_shaped_outputs_through_the_qwen3_tokenizer():
  """ReasonRank-8B writes `<think>` itself (one Qwen3 token, kept when special tokens are skipped, as the
  backend decodes); the parser then takes upstream's path for rank_GPT_qwen3, the same as for 7B."""
  from rrjax import tokenizer as tok_lib
  tok = tok_lib.load(model_type="qwen3")

  def generated(text):  # what the engine hands back: token ids up to and including the stop token
    ids = tok.encode(text) + [tok.eos_token_id]
    return tok.decode(ids, skip_special_tokens=True)

  native = generated("<think>\nPassage [1] cites 1999; [3] answers it.\n</think>\n\n<answer>[3] > [1] > [2]</answer>")
  assert native.startswith("<think>\nPassage") and native.endswith("</answer>")
  assert parse_permutation_with_source(native, 4) == ([2, 0, 1, 3], "answer_tag")
  # Tags but no think block: the regex fails; the text after <answer> is read.
  assert parse_permutation_with_source(generated("<answer> [2] > [4] </answer>"), 4) == ([1, 3, 0, 2], "last_answer")
  # Reasoning cut off at the token budget: no answer tag, the digits of the whole output (upstream prints
  # "the reasoning length is too long." and does the same).
  cut = generated("<think>\nCompare [2] with [1], then")
  assert parse_permutation_with_source(cut, 3) == ([1, 0, 2], "whole_text")
  # Digits only, as the plain prompt asks.
  assert parse_permutation_with_source(generated("[3] > [1] > [2]"), 3) == ([2, 0, 1], "whole_text")
