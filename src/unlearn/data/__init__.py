"""Corpora -> tokenized examples -> (forget, retain) micro-batches."""

from unlearn.data.batching import Batch, ExampleStream, collate, tokenize_examples
from unlearn.data.corpus import (
    CorpusSpec,
    load_documents,
    load_texts,
    mix_documents,
    sample_documents,
)

__all__ = [
    "Batch",
    "CorpusSpec",
    "ExampleStream",
    "collate",
    "load_documents",
    "load_texts",
    "mix_documents",
    "sample_documents",
    "tokenize_examples",
]
