"""Data: TREC I/O (trec.py), documents/queries/qrels in published layouts (corpus.py), benchmarks by name
(benchmarks.py), BM25 (bm25.py), a rerank's inputs (inputs.py), SFT and RL examples (sft.py, rl.py), the TFDS
builder (builders.py) and grain pipeline (pipeline.py). Import the submodule you need; they are not loaded
eagerly because tfds and grain are heavy."""
