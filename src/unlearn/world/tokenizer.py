"""A byte-level BPE tokenizer trained on the world's own corpus.

Byte-level (GPT-2 style) pre-tokenization puts a word's leading space inside its token, so a
question prompt without a trailing space followed by a choice with a leading space splits exactly
at the boundary: `encode(prompt + choice) == encode(prompt) + encode(choice)`, which is what
cloze scoring assumes. No prefix space is added, so a line-initial name in a document and a
prompt-initial name in a question are the same tokens. There is no BOS token; one EOS token
separates packed documents and doubles as the pad token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (including 256 bytes and EOS) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
