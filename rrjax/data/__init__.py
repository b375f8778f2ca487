"""Data: TREC I/O (trec.py), SFT examples (sft.py), the TFDS builder (builders.py) and grain pipeline
(pipeline.py). Import the submodule you need; they are not loaded eagerly because tfds and grain are heavy."""
