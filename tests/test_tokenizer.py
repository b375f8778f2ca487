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


# ---- the bundled Qwen3 tokenizer

QWEN3_SHA256 = {"tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
                "tokenizer_config.json": "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101"}


@pytest.fixture(scope="module")
def qwen3():
  return tok_lib.load(model_type="qwen3")


def test_qwen3_files_are_the_official_ones(qwen3):
  import hashlib
  assert qwen3.source_dir == tok_lib.QWEN3_ASSET_DIR
  for name, digest in QWEN3_SHA256.items():
    assert hashlib.sha256((tok_lib.QWEN3_ASSET_DIR / name).read_bytes()).hexdigest() == digest, name


def test_qwen3_think_tokens_and_stops(qwen3, tok):
  assert len(qwen3) == 151669
  assert qwen3.think_ids == (151667, 151668) and tok.think_ids is None
  assert qwen3.stop_ids == (151643, 151645) and not set(qwen3.think_ids) & set(qwen3.stop_ids)
  # PROVENANCE.md's example: Qwen3 reads <think> as one token where Qwen2.5 spells it out.
  text = "Hello, 世界! <think> reasoning </think> <answer> [3] > [1] </answer>\n\n 12345"
  assert qwen3.encode(text) == [9707, 11, 220, 99489, 0, 220, 151667, 32711, 220, 151668, 366, 9217, 29, 508, 18,
                                60, 861, 508, 16, 60, 690, 9217, 1339, 220, 16, 17, 18, 19, 20]
  assert tok.encode(text)[5:12] == [366, 26865, 29, 32711, 690, 26865, 29]
  # Not special: decoding with special tokens skipped keeps them, so the parser sees the model's own tags.
  ids = [151667, 32711, 151668, 151645]
  assert qwen3.decode(ids, skip_special_tokens=True) == "<think> reasoning</think>"


def test_qwen3_chat_template_matches_transformers(qwen3):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(str(tok_lib.QWEN3_ASSET_DIR))
  msgs = [{"role": "system", "content": "S [1] ü"}, {"role": "user", "content": "U\n\nx"}]
  text = qwen3.apply_chat_template(msgs, add_generation_prompt=True)
  # ReasonRank's call (no enable_thinking): thinking on, nothing after the assistant header.
  assert text == "<|im_start|>system\nS [1] ü<|im_end|>\n<|im_start|>user\nU\n\nx<|im_end|>\n<|im_start|>assistant\n"
  assert text == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert qwen3.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
  assert len(ref) == len(qwen3) and ref.eos_token_id == qwen3.eos_token_id


def test_qwen3_checkpoint_tokenizer_wins(tmp_path, tok, qwen3):
  assert tok_lib.load(tmp_path, model_type="qwen3").source_dir == tok_lib.QWEN3_ASSET_DIR
  tok.save(tmp_path)  # a Qwen3 checkpoint that brings its own (here Qwen2.5's) tokenizer keeps it
  assert tok_lib.load(tmp_path, model_type="qwen3").think_ids is None
  bare = tmp_path / "bare"  # a tokenizer.json without a chat template takes the family's bundled one
  bare.mkdir()
  (bare / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
  assert tok_lib.load(bare, model_type="qwen3").chat_template == qwen3.chat_template
  with pytest.raises(tok_lib.TokenizerError, match="model_type 'llama' has no bundled tokenizer"):
    tok_lib.load(model_type="llama")
