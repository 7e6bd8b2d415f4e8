"""Requests turned into the token rows the native evaluator runs, and a cache of them.

`encode_requests` splits each (context, continuation) into token ids exactly as lm-eval's HF
model does (`unlearn.eval.native` gives the rules); `rows_of` packs them into the fewest
sequences. Both depend only on the tokenizer, the requests and the context window, not on the
weights, so `encoded_rows` keeps the result for the next evaluation of the same questions with
the same tokenizer: an attack curve, `--eval_every` or a robustness suite evaluates one suite
many times, and tokenising it was about a quarter of a native evaluation of a small model.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

Request = tuple[str, str]
"""(context, continuation), as in an lm-eval loglikelihood request."""

CACHE_SIZE = 64
"""Encoded request lists kept per process (a suite is a few tasks; a campaign a few suites)."""


@dataclass(frozen=True)
class Row:
    """One sequence to run and the request scores read from it.

    `reads` holds (request idx, first predicting position, target ids): the request's score is
    the sum of log p(target_k) at positions first + k.
    """

    ids: list[int]
    reads: list[tuple[int, int, list[int]]]


def _encoder(tokenizer, special_tokens: bool | None):
    """`encode(texts) -> ids lists` with lm-eval's rule for special tokens (module docstring)."""
    bos = tokenizer.decode(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None

    def encode(texts: list[str]) -> list[list[int]]:
        if special_tokens is False:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched call
        has_bos = [bool(bos) and t.startswith(bos) for t in texts]
        plain = [t for t, b in zip(texts, has_bos, strict=True) if not b]
        ids = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
        return [
            tokenizer.encode(t, add_special_tokens=False) if b else next(ids)
            for t, b in zip(texts, has_bos, strict=True)
        ]

    return encode


def prefix_token(tokenizer) -> int:
    """The token a sequence starts from when nothing precedes it: BOS, else EOS (lm-eval's
    rule; the world's tokenizer has only EOS, its document separator)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def encode_requests(
    tokenizer, requests: Sequence[Request], special_tokens: bool | None = False
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each request, as lm-eval's HF model splits them."""
    pairs = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        pairs.append((context, continuation))
    encode = _encoder(tokenizer, special_tokens)
    # A question's choices share its context: each distinct context is encoded once.
    unique = list(dict.fromkeys(c for c, _ in pairs if c))
    wholes_text = [c + x for c, x in pairs if c]
    encoded = encode(unique + wholes_text) if unique else []
    contexts = dict(zip(unique, encoded[: len(unique)], strict=True))
    wholes = iter(encoded[len(unique) :])
    out = []
    for context, continuation in pairs:
        if not context:  # lm-eval: the prefix token is the context
            out.append(([prefix_token(tokenizer)], encode([continuation])[0]))
            continue
        ctx, whole = contexts[context], next(wholes)
        out.append((ctx, whole[len(ctx) :]))
    return out


def rows_of(encoded: Sequence[tuple[list[int], list[int]]], max_length: int | None) -> list[Row]:
    """The fewest sequences that score every request.

    Requests with the same context whose continuations are each one token extending that
    context's own tokens are read from ONE forward of the context, at its last position. A
    sequence longer than `max_length` + 1 keeps its last tokens, as lm-eval does.
    """
    rows: list[Row] = []
    shared: dict[tuple[int, ...], Row] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError("a continuation adds no tokens to its context")
        fed = (ctx + cont)[:-1]
        if max_length is not None and len(fed) > max_length:
            fed = fed[-max_length:]
        read = (i, len(fed) - len(cont), cont)
        if read[1] < 0:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the context window")
        if len(cont) == 1:  # `fed` is the context's tokens (their last max_length)
            key = tuple(fed)
            if key not in shared:
                shared[key] = Row(fed, [])
                rows.append(shared[key])
            shared[key].reads.append(read)
            continue
        rows.append(Row(fed, [read]))
    return rows


_CACHE: OrderedDict[tuple, list[Row]] = OrderedDict()
_TOKENIZER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_key(tokenizer) -> str:
    """A digest of what decides how `tokenizer` encodes text: its class, its serialised
    pipeline (vocabulary, merges, normaliser, pre- and post-processor: a fast tokenizer's
    `to_str`) and its special tokens. Two loads of the same tokenizer files share a key. A
    tokenizer with no serialised form (a slow one) gets a key of its own object."""
    with contextlib.suppress(KeyError, TypeError):
        return _TOKENIZER_KEYS[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        key = f"object-{id(tokenizer)}"
    else:
        h = hashlib.sha256(type(tokenizer).__qualname__.encode())
        h.update(backend.to_str().encode())
        h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
        h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
        key = h.hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: recomputed next time
        _TOKENIZER_KEYS[tokenizer] = key
    return key


def _requests_digest(requests: Sequence[Request]) -> str:
    h = hashlib.sha256()
    for context, continuation in requests:
        # Lengths first: no two different request lists give the same byte stream.
        c, x = context.encode(), continuation.encode()
        h.update(b"%d:%d:" % (len(c), len(x)))
        h.update(c)
        h.update(x)
    return h.hexdigest()


def encoded_rows(
    tokenizer,
    requests: Sequence[Request],
    special_tokens: bool | None,
    max_length: int | None,
) -> list[Row]:
    """`rows_of(encode_requests(...))`, from the cache when the same requests were encoded
    with the same tokenizer, special-token rule and context window in this process. The rows
    are shared: callers read them and never change them."""
    key = (tokenizer_key(tokenizer), special_tokens, max_length, _requests_digest(requests))
    rows = _CACHE.get(key)
    if rows is None:
        rows = rows_of(encode_requests(tokenizer, requests, special_tokens), max_length)
        _CACHE[key] = rows
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return rows


def clear_cache() -> None:
    """Forget every encoded request list (tests; a process that changes a tokenizer in place)."""
    _CACHE.clear()
    _TOKENIZER_KEYS.clear()
