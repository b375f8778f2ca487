"""The bundled Qwen2.5 tokenizer against llama.cpp's vectors, published goldens and transformers' template."""

import json

import pytest

from rrjax import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load()


def test_llamacpp_vectors(tok, data_dir):
  d = data_dir / "qwen2.5-tokenizer"
  texts = (d / "llamacpp-vocab-qwen2.test.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
  ids = (d / "llamacpp-vocab-qwen2.test.out").read_text().split("\n")[: len(texts)]
  assert len(texts) == 46
  for text, line in zip(texts, ids):
    expected = [int(x) for x in line.split()]
    assert tok.encode(text) == expected, repr(text)
    assert tok.decode(expected) == text


def test_goldens_with_special_tokens(tok, data_dir):
  cases = json.loads((data_dir / "qwen2.5-tokenizer" / "qwen2.5_golden_tokens_subset.json").read_text())["cases"]
  assert len(cases) == 10
  for case in cases:
    assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_special_ids(tok):
  assert len(tok) == 151665
  assert tok.eos_token_id == 151645
  assert tok.pad_token_id == 151643
  assert tok.stop_ids == (151643, 151645)
  assert tok.encode("<think>") == [13708, 766, 29]


def test_chat_template_exact(tok):
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=True)
  assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
  assert tok.apply_chat_template(msgs, tokenize=True) == [
      151644, 8948, 198, 50, 151645, 198, 151644, 872, 198, 52, 151645, 198, 151644, 77091, 198]
  default = tok.apply_chat_template([{"role": "user", "content": "U"}])
  assert default.startswith(
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_chat_template_matches_transformers(tok):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(str(tok_lib.ASSET_DIR))
  conversations = [
      [{"role": "user", "content": "héllo [1] wörld\n\nline"}],
      [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
       {"role": "assistant", "content": "<think>x</think> <answer>[2] > [1]</answer>"},
       {"role": "user", "content": "b"}],
  ]
  for msgs in conversations:
    for gen in (True, False):
      assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
          msgs, add_generation_prompt=gen, tokenize=False)
  text = "Some passage with ünïcödé, emoji 🎉 and numbers 12345 [3]."
  assert tok.tokenize(text) == ref.tokenize(text)
  toks = ref.tokenize(text)[:7]
  assert tok.convert_tokens_to_string(toks) == ref.convert_tokens_to_string(toks)


def test_checkpoint_tokenizer_wins(tmp_path, tok):
  tok.save(tmp_path)
  assert (tmp_path / "tokenizer.json").exists()
  other = tok_lib.load(tmp_path)
  assert other.source_dir == tmp_path
  assert tok_lib.load(tmp_path / "missing").source_dir == tok_lib.ASSET_DIR


def test_bad_tokenizer_file(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(tok_lib.TokenizerError, match="tokenizer.json"):
    tok_lib.load(tmp_path)
