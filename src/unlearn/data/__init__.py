"""Corpora -> tokenized examples -> (forget, retain) micro-batches."""

from unlearn.data.batching import Batch, ExampleStream, collate, tokenize_examples
from unlearn.data.corpus import load_texts

__all__ = ["Batch", "ExampleStream", "collate", "load_texts", "tokenize_examples"]
