"""rrjax.data.sft / builders / pipeline: released formats -> tokens + loss mask -> ArrayRecord -> grain."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from rrjax import tokenizer as tokenizer_lib
from rrjax.data import builders, pipeline, sft
from rrjax.data.trec import TrecFormatError
from rrjax.ranking.prompt import build_prompt

QUERIES = {"q1": "Why is the [1] sky blue?", "q2": "integral of x^2"}
DOCS = {"d1": "Rayleigh scattering makes short wavelengths scatter more.",
        "d2": {"title": "Sunsets", "text": "At sunset the light travels through more air [3]."},
        "d3": "Café au lait is a coffee drink.",
        "d4": "The antiderivative of x^2 is x^3/3 + C.",
        "d5": "Integration by parts."}
ROWS = [
    {"dataset": "physics", "qid": "q1", "initial_list": ["d1", "d2", "d3"], "final_list": ["d2", "d1", "d3"],
     "reasoning": "  Okay, d2 and d1 both explain colour.\n", "relevant_docids": ["d1", "d2"]},
    {"dataset": "math-qa", "qid": "q2", "initial_list": ["d5", "d4"], "final_list": ["d4", "d5"],
     "reasoning": "d4 answers it.", "relevant_docids": ["d4"]},
]
SFT_ROWS = [
    {"system": "You are RankLLM.", "instruction": "Rank [1] a\n[2] b",
     "output": "<think>\nx\n</think>\n<answer>[2] > [1]</answer> "},
    {"system": "", "instruction": "Rank", "input": "extra", "output": "ok"},
]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


@pytest.fixture
def files(tmp_path):
  (tmp_path / "id_query").mkdir()
  (tmp_path / "id_doc").mkdir()
  # Two layouts: jsonl records (with differing field names) and a plain {id: text} dict.
  (tmp_path / "id_query" / "queries.jsonl").write_text(
      json.dumps({"id": "q1", "text": QUERIES["q1"]}) + "\n" + json.dumps({"qid": "q2", "query": QUERIES["q2"]}) + "\n")
  (tmp_path / "id_doc" / "docs.json").write_text(json.dumps(DOCS))
  train = tmp_path / "training_data_all.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  sft_json = tmp_path / "reasonrank_sft-data.json"
  sft_json.write_text(json.dumps(SFT_ROWS, indent=1))
  return {"train": train, "id_query": tmp_path / "id_query", "id_doc": tmp_path / "id_doc", "sft": sft_json}


def _read_train(files, tok, **kw):
  return list(sft.read_training_jsonl(files["train"], files["id_query"], files["id_doc"], tokenizer=tok, **kw))


def test_training_jsonl_prompt_target_metadata(files, tok):
  ex = _read_train(files, tok)
  assert len(ex) == 2
  assert ex[0].prompt == build_prompt(QUERIES["q1"], [DOCS["d1"], DOCS["d2"], DOCS["d3"]], tok)
  assert ex[1].prompt == build_prompt(QUERIES["q2"], [DOCS["d5"], DOCS["d4"]], tok)
  assert "[2] Title: Sunsets Content: At sunset" in ex[0].prompt and "(3)." in ex[0].prompt
  assert ex[0].target == "<think>Okay, d2 and d1 both explain colour.</think> <answer>[2] > [1] > [3]</answer>"
  assert ex[1].target == "<think>d4 answers it.</think> <answer>[2] > [1]</answer>"
  assert ex[0].metadata["source"] == f"{files['train']}:1" and ex[1].metadata["qid"] == "q2"
  assert ex[0].metadata["relevant_docids"] == ["d1", "d2"] and ex[1].metadata["dataset"] == "math-qa"


def test_sft_json_list_and_jsonl(files, tok, tmp_path):
  ex = list(sft.read_sft_json(files["sft"], tokenizer=tok))
  # LLaMA-Factory's qwen template: system slot, user slot ending in the assistant header.
  assert ex[0].prompt == ("<|im_start|>system\nYou are RankLLM.<|im_end|>\n<|im_start|>user\nRank [1] a\n[2] b"
                          "<|im_end|>\n<|im_start|>assistant\n")
  assert ex[0].target == SFT_ROWS[0]["output"]  # exactly, trailing space included
  assert ex[1].prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
  # ReasonRank's dataset_info maps no `input` column: LLaMA-Factory never appends it.
  assert "<|im_start|>user\nRank<|im_end|>" in ex[1].prompt and "extra" not in ex[1].prompt
  assert ex[1].metadata["source"] == f"{files['sft']}:[1]"
  jsonl = tmp_path / "sft.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
  assert [e.prompt for e in sft.read_sft_json(jsonl, tokenizer=tok)] == [e.prompt for e in ex]


def test_loss_mask_is_exactly_the_response(files, tok):
  for ex in _read_train(files, tok) + list(sft.read_sft_json(files["sft"], tokenizer=tok)):
    out = sft.tokenize_example(ex, tok)
    tokens, mask = out["tokens"], out["loss_mask"]
    assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == mask.shape
    assert not out["truncated"]
    n = out["prompt_len"]
    assert mask[:n].sum() == 0 and mask[n:].all() and out["target_len"] == len(tokens) - n
    assert tok.decode(tokens[mask == 1]) == ex.target + "<|im_end|>\n"
    assert tok.decode(tokens[mask == 0]) == ex.prompt
    assert tokens[mask == 1][-2] == tok.eos_token_id


def test_infer_seqlen_mirrors_llama_factory():
  assert sft.infer_seqlen(300, 40, 200) == (160, 40)  # short response: cut the prompt
  assert sft.infer_seqlen(40, 300, 200) == (40, 160)  # short prompt: cut the response
  assert sft.infer_seqlen(300, 100, 200) == (150, 50)  # both long: proportional
  assert sft.infer_seqlen(10, 20, 100) == (10, 20)


def test_cutoff_truncation(files, tok):
  ex = _read_train(files, tok)[0]
  source = tok.encode(ex.prompt)
  target = tok.encode(ex.target + "<|im_end|>\n")
  for cutoff in (len(target) * 2 + 10, 40):
    out = sft.tokenize_example(ex, tok, cutoff_len=cutoff)
    s, t = sft.infer_seqlen(len(source), len(target), cutoff)
    assert out["truncated"] and len(out["tokens"]) == cutoff == s + t
    assert out["tokens"].tolist() == source[:s] + target[:t]
    assert out["loss_mask"].tolist() == [0] * s + [1] * t


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.update(final_list=["d5", "d9"]), "final_list"),
    (lambda r: r.update(final_list=["d4", "d4"]), "final_list"),
    (lambda r: r.update(qid="q404"), "qid"),
    (lambda r: r.pop("qid"), "qid"),
    (lambda r: r.update(initial_list=["d5", "nope"], final_list=["d5"]), "initial_list"),
    (lambda r: r.update(initial_list=[f"d{i}" for i in range(21)]), "initial_list"),
    (lambda r: r.update(reasoning=None), "reasoning"),
    (lambda r: r.update(relevant_docids="d4"), "relevant_docids"),
])
def test_malformed_row_names_file_line_and_field(files, tok, mutate, field):
  rows = json.loads(json.dumps(ROWS))
  mutate(rows[1])
  files["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(TrecFormatError, match=rf"training_data_all\.jsonl:2: field '{field}'"):
    _read_train(files, tok)


def test_malformed_json_and_sft_rows(files, tok):
  files["train"].write_text(json.dumps(ROWS[0]) + "\n{not json\n")
  with pytest.raises(TrecFormatError, match=r"training_data_all\.jsonl:2: bad JSON"):
    _read_train(files, tok)
  rows = json.loads(json.dumps(SFT_ROWS))
  del rows[1]["output"]
  files["sft"].write_text(json.dumps(rows))
  with pytest.raises(TrecFormatError, match=r"reasonrank_sft-data\.json:\[1\]: field 'output'"):
    list(sft.read_sft_json(files["sft"], tokenizer=tok))
  (files["id_doc"] / "more.jsonl").write_text(json.dumps({"docid": "d1", "text": "different"}) + "\n")
  with pytest.raises(TrecFormatError, match=r"more\.jsonl:1: id 'd1' appears twice"):
    sft.read_id_table(files["id_doc"])


def test_tfds_array_record_round_trip(files, tok, tmp_path):
  sources = [builders.SFTSource(str(files["train"]), str(files["id_query"]), str(files["id_doc"])),
             builders.SFTSource(str(files["sft"]))]
  builders.build_sft(tmp_path / "tfds", {"train": sources}, tokenizer=tok)
  assert list((tmp_path / "tfds" / "rrjax_sft" / "1.0.0").glob("rrjax_sft-train.array_record-*"))
  source = builders.load_source(tmp_path / "tfds", "train")
  expected = _read_train(files, tok) + list(sft.read_sft_json(files["sft"], tokenizer=tok))
  assert len(source) == len(expected) == 4
  for i, ex in enumerate(expected):
    got = {**source[i], **{k: source[i][k].decode() for k in ("prompt", "target")},
           "metadata": json.loads(source[i]["metadata"].decode())}
    want = builders.to_features(ex, tok)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
    assert got["tokens"].dtype == np.int32 and got["prompt_len"] == want["prompt_len"]
    assert (got["prompt"], got["target"], got["metadata"]) == (ex.prompt, ex.target, dict(ex.metadata))
  # The stored source feeds the pipeline directly.
  batches = list(pipeline.make_sft_iterator(source, batch_size=2, seq_len=2048, seed=0))
  assert sum(len(np.unique(b["segment_ids"][b["segment_ids"] > 0])) for b in batches) >= 2
  assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(int(sft.tokenize_example(e, tok)["target_len"])
                                                                 for e in expected)
  rebuilt = builders.build_sft(tmp_path / "tfds", {"train": sources[1:]}, tokenizer=tok, overwrite=True)
  assert len(rebuilt.as_data_source(split="train")) == 2
  # Reader errors surface unchanged from inside the TFDS build, and leave no half-written version.
  files["sft"].write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
  with pytest.raises(TrecFormatError, match=r"reasonrank_sft-data\.json:\[1\]: field 'output'"):
    builders.build_sft(tmp_path / "bad", {"train": sources[1:]}, tokenizer=tok)
  assert not (tmp_path / "bad" / "rrjax_sft" / "1.0.0").exists()
  with pytest.raises(ValueError, match="no split 'test'"):
    builders.load_source(tmp_path / "tfds", "test")
  with pytest.raises(ValueError, match="no prepared rrjax_sft"):
    builders.load_source(tmp_path / "empty", "train")


def _synthetic(n=23):
  """Record i: tokens (i+1)*1000 + [0..len) so every token names its example; lengths 1..9."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    length = int(rng.integers(1, 10))
    tokens = (i + 1) * 1000 + np.arange(length, dtype=np.int32)
    out.append({"tokens": tokens, "loss_mask": (np.arange(length) >= length // 2).astype(np.int32)})
  return out


OPTS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def _segments(batches):
  """Every (example id, tokens, loss_mask) in batch order, checking segment/position layout on the way."""
  found = []
  for b in batches:
    assert set(b) == set(pipeline.BATCH_KEYS)
    assert all(v.dtype == np.int32 and v.shape == b["tokens"].shape for v in b.values())
    for row in range(b["tokens"].shape[0]):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      assert (b["loss_mask"][row][seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
      ids = [s for s in np.unique(seg) if s > 0]
      assert ids == list(range(1, len(ids) + 1))
      for s in ids:
        where = np.nonzero(seg == s)[0]
        assert (np.diff(where) == 1).all()  # contiguous: never split
        assert pos[where].tolist() == list(range(len(where)))
        toks = b["tokens"][row][where]
        assert len(set(toks // 1000)) == 1
        found.append((int(toks[0] // 1000) - 1, toks.tolist(), b["loss_mask"][row][where].tolist()))
  return found


@pytest.mark.parametrize("packing", [True, False])
def test_packing_and_padding_layout(packing):
  src = _synthetic()
  batches = list(pipeline.make_sft_iterator(src, batch_size=3, seq_len=12, seed=3, packing=packing,
                                            read_options=OPTS))
  assert all(b["tokens"].shape == (3, 12) for b in batches)
  found = _segments(batches)
  assert sorted(i for i, _, _ in found) == list(range(len(src)))  # every example once, whole
  for i, toks, mask in found:
    assert toks == src[i]["tokens"].tolist() and mask == src[i]["loss_mask"].tolist()
  if packing:
    assert len(batches) < -(-len(src) // 3)  # fewer rows than one example per row
  else:
    assert all(b["segment_ids"].max(axis=1).max() <= 1 for b in batches)


def test_packing_by_samples_keeps_the_count_and_whole_micro_batches():
  """packing='samples': every batch holds exactly batch_size examples (the last one the rest), packed into as
  few rows as hold them, the row count a multiple of row_multiple; every example once, whole."""
  src = _synthetic()
  batches = list(pipeline.make_sft_iterator(src, batch_size=5, seq_len=12, seed=3, packing="samples",
                                            row_multiple=2, read_options=OPTS))
  counts = [int(sum(len(np.unique(r[r > 0])) for r in b["segment_ids"])) for b in batches]
  assert counts == [5, 5, 5, 5, 3]
  assert all(b["tokens"].shape[0] % 2 == 0 and b["tokens"].shape[1] == 12 for b in batches)
  assert len({b["tokens"].shape[0] for b in batches}) > 1  # the row count follows the lengths
  found = _segments(batches)
  assert sorted(i for i, _, _ in found) == list(range(len(src)))
  for i, toks, mask in found:
    assert toks == src[i]["tokens"].tolist() and mask == src[i]["loss_mask"].tolist()
  real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert real == sum(len(e["tokens"]) for e in src)
  assert sum(b["tokens"].size for b in batches) < 2 * real + 2 * 12 * len(batches)  # little padding
  with pytest.raises(ValueError, match="SFTDataConfig.packing"):
    pipeline.packing_mode("bins")


def test_packed_samples_keep_the_device_they_were_drawn_for():
  """packing='samples' with 4 loss groups (devices) on each of 2 processes: group g of a batch holds the g-th
  quarter of that process's draw (the stream order an unpacked run trains in; a last batch of 4, one each),
  numbered after the other process's groups, whatever rows the longest-first packing puts them in."""
  src = _synthetic(40)
  kw = dict(batch_size=8, seq_len=12, seed=4, process_count=2, read_options=OPTS)
  for p in range(2):
    drawn = [i for i, _, _ in _segments(pipeline.make_sft_iterator(src, packing=False, process_index=p, **kw))]
    packed = list(pipeline.make_sft_iterator(src, packing="samples", row_multiple=2, loss_groups=4, process_index=p,
                                             **kw))
    mixed = 0
    for b, batch in enumerate(packed):
      seg, grp = batch["segment_ids"], batch["sample_group"]
      assert (grp[seg == 0] == 0).all()
      for row in range(seg.shape[0]):
        mixed += len(np.unique(grp[row][seg[row] > 0])) > 1
        for s in np.unique(seg[row][seg[row] > 0]):
          (example,) = {int(t) // 1000 - 1 for t in batch["tokens"][row][seg[row] == s]}
          (group,) = set(grp[row][seg[row] == s].tolist())
          within, size = drawn.index(example) - 8 * b, min(8, len(drawn) - 8 * b)  # the last batch: 4 examples
          parts = np.array_split(np.arange(size), 4)
          assert within in parts[group - 1 - 4 * p], (example, group)
    assert mixed > 0  # packing crosses groups: the weights, not the rows, carry the devices


def test_long_example_is_cut_to_seq_len():
  src = [{"tokens": np.arange(20, dtype=np.int32), "loss_mask": np.ones(20, np.int32)}]
  (b,) = list(pipeline.make_sft_iterator(src, batch_size=1, seq_len=8, seed=0))
  assert b["tokens"][0].tolist() == list(range(8)) and b["segment_ids"][0].tolist() == [1] * 8


def test_seeded_shuffle_is_reproducible():
  src = _synthetic()
  order = lambda seed, **kw: [i for i, _, _ in _segments(pipeline.make_sft_iterator(
      src, batch_size=2, seq_len=16, seed=seed, read_options=OPTS, **kw))]
  assert order(7) == order(7)
  assert order(7) != order(8)
  assert order(7, shuffle=False, packing=False) == list(range(len(src)))
  two = order(7, num_epochs=2)  # each epoch is a full pass, in a different order
  assert sorted(two) == sorted(list(range(len(src))) * 2)


def test_process_slices_disjoint_and_covering():
  src = _synthetic()
  per = [[i for i, _, _ in _segments(pipeline.make_sft_iterator(
      src, batch_size=2, seq_len=16, seed=5, process_index=p, process_count=3, read_options=OPTS))]
         for p in range(3)]
  assert all(per) and sorted(sum(per, [])) == list(range(len(src)))
  assert all(len(set(per[a]) & set(per[b])) == 0 for a in range(3) for b in range(a + 1, 3))


@pytest.mark.parametrize("packing", [True, False, "samples"])
def test_iterator_state_resumes_exactly(packing):
  src = _synthetic()
  kw = dict(batch_size=2, seq_len=12, seed=11, num_epochs=2, packing=packing, read_options=OPTS)
  full = list(pipeline.make_sft_iterator(src, **kw))
  it = pipeline.make_sft_iterator(src, **kw)
  head = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
  fresh = pipeline.make_sft_iterator(src, **kw)
  fresh.set_state(state)
  rest = list(fresh)
  assert len(head) + len(rest) == len(full)
  for a, b in zip(head + rest, full):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_next_token_targets():
  batch = {"tokens": np.array([[5, 6, 7, 8, 9, 0]]), "loss_mask": np.array([[0, 1, 1, 0, 1, 0]]),
           "segment_ids": np.array([[1, 1, 1, 2, 2, 0]])}
  targets, weights = pipeline.next_token_targets(batch)
  assert targets.tolist() == [[6, 7, 8, 9, 0, 0]]
  assert weights.tolist() == [[1, 1, 0, 1, 0, 0]]  # never across the segment boundary or into padding
