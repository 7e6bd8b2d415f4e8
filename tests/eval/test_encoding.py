"""The encoded-request cache: a suite is tokenised once per tokenizer, and only then."""

from __future__ import annotations

import pytest

from unlearn.eval import encoding
from unlearn.eval.encoding import encode_requests, encoded_rows, rows_of, tokenizer_key
from unlearn.eval.native import score_requests
from unlearn.models.load import load_model, load_tokenizer
from unlearn.models.refs import resolve_model
from unlearn.world.tokenizer import train_tokenizer

REQUESTS = [
    ("The river flows past the old mill", "."),
    ("The river flows past the old mill", ","),
    ("The bread is", " sold before"),
    ("The bread is", " market opens"),
    ("", "Bakers rise early"),
]


@pytest.fixture
def counted(monkeypatch):
    """The number of times requests were really encoded, with an empty cache."""
    encoding.clear_cache()
    calls = []
    real = encoding.encode_requests

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_requests", spy)
    yield calls
    encoding.clear_cache()


@pytest.fixture(scope="module")
def model_dir(tiny_hf_models):
    return str(tiny_hf_models["gpt_neox"])


def test_the_second_evaluation_reuses_the_encoding_and_scores_the_same(model_dir, counted):
    ref = resolve_model(model_dir)
    model, tok = load_model(ref), load_tokenizer(ref)
    first = score_requests(model, tok, REQUESTS, batch_size=2)
    second = score_requests(model, tok, REQUESTS, batch_size=2)
    assert len(counted) == 1
    assert first == second
    # A fresh load of the same tokenizer files is the same tokenizer.
    third = score_requests(model, load_tokenizer(ref), REQUESTS, batch_size=2)
    assert len(counted) == 1 and third == first


def test_cached_rows_equal_a_fresh_encoding(model_dir, counted):
    tok = load_tokenizer(resolve_model(model_dir))
    cached = encoded_rows(tok, REQUESTS, False, 16)
    assert encoded_rows(tok, REQUESTS, False, 16) is cached
    assert cached == rows_of(encode_requests(tok, REQUESTS, False), 16)


@pytest.mark.parametrize(
    "change", ["requests", "order", "special_tokens", "max_length", "tokenizer"]
)
def test_anything_that_changes_the_rows_misses_the_cache(model_dir, counted, change):
    tok = load_tokenizer(resolve_model(model_dir))
    encoded_rows(tok, REQUESTS, False, 16)
    requests, special, max_length, other = REQUESTS, False, 16, tok
    if change == "requests":
        requests = [*REQUESTS[:-1], ("", "Bakers rise late")]
    elif change == "order":
        requests = REQUESTS[::-1]
    elif change == "special_tokens":
        special = None
    elif change == "max_length":
        max_length = 32
    else:
        other = train_tokenizer(["a different corpus, a different vocabulary"] * 20, 300)
        assert tokenizer_key(other) != tokenizer_key(tok)
    rows = encoded_rows(other, requests, special, max_length)
    assert len(counted) == 2
    assert rows == rows_of(encode_requests(other, requests, special), max_length)


def test_the_cache_is_bounded(model_dir, counted, monkeypatch):
    monkeypatch.setattr(encoding, "CACHE_SIZE", 3)
    tok = load_tokenizer(resolve_model(model_dir))
    for i in range(5):
        encoded_rows(tok, [("The bread is", f" {i}")], False, None)
    assert len(encoding._CACHE) == 3
    encoded_rows(tok, [("The bread is", " 0")], False, None)  # evicted: encoded again
    assert len(counted) == 6
