"""Tokenizers the reasoner and the memory share.

The reasoner speaks its memory backbone's tokenizer, so both sides of the model agree on
what a token is. Hugging Face tokenizers are wrapped behind one small interface; inline
random backbones (used in tests) get a byte tokenizer, because nothing can be downloaded.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class TextTokenizer(Protocol):
    vocab_size: int  # number of token ids the reasoner's embedding must cover
    bos_id: int  # first input of the reasoner's answer
    eos_id: int  # the reasoner's end of answer
    pad_id: int  # filler in padded batches (never scored)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (reasoner targets)."""

    def encode_context(self, text: str, max_length: int) -> list[int]:
        """Token ids of a memory input, with the backbone's own special tokens, cut to `max_length`."""

    def encode_context_and_length(self, text: str, max_length: int) -> tuple[list[int], int]:
        """`encode_context`'s ids, and how many tokens the input has before the cut."""

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus pad/bos/eos: for random-weight backbones."""

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_context(self, text: str, max_length: int) -> list[int]:
        return self.encode(text)[:max_length]

    def encode_context_and_length(self, text: str, max_length: int) -> tuple[list[int], int]:
        ids = self.encode(text)
        return ids[:max_length], len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer with bos/eos/pad resolved for any family.

    Encoder models (BERT) have no bos/eos; their [CLS]/[SEP] play those roles.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        t = tokenizer
        self.bos_id = _first_id(t.bos_token_id, t.cls_token_id, t.eos_token_id)
        self.eos_id = _first_id(t.eos_token_id, t.sep_token_id, t.bos_token_id)
        self.pad_id = _first_id(t.pad_token_id, self.eos_id)
        self.vocab_size = len(t)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_context(self, text: str, max_length: int) -> list[int]:
        return self.hf(text, truncation=True, max_length=max_length)["input_ids"]

    def encode_context_and_length(self, text: str, max_length: int) -> tuple[list[int], int]:
        """Tokenizes once for an input that fits; a longer one is tokenized again with the
        backbone's own truncation, which keeps its special tokens."""
        ids = self.hf(text, verbose=False)["input_ids"]  # verbose=False: no "longer than the model" warning
        if len(ids) <= max_length:
            return ids, len(ids)
        return self.encode_context(text, max_length), len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


def _first_id(*candidates: int | None) -> int:
    for c in candidates:
        if c is not None:
            return int(c)
    raise ValueError("the tokenizer defines none of bos/cls/eos/sep tokens; the reasoner needs one")
