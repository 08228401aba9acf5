"""Tokenizers the reasoner and the memory share.

The reasoner speaks its memory backbone's tokenizer, so both sides of the model agree on
what a token is. Hugging Face tokenizers are wrapped behind one small interface; inline
random backbones (used in tests) get a byte tokenizer, because nothing can be downloaded.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


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

    def word_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(continues, joins), each (vocab_size,) bool, for grouping tokens into words: token
        i continues the word of token i-1 when continues[id_i] and joins[id_{i-1}]."""


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

    def word_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A word is a space and the ASCII letters and digits after it ("Every", " terpus")."""
        alnum = torch.tensor([chr(i).isascii() and chr(i).isalnum() for i in range(256)] + [False] * 3)
        return alnum, alnum | (torch.arange(self.vocab_size) == ord(" "))


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

    def word_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """WordPiece: a "##" piece continues the word before it ("ter", "##pus"). Byte-level
        BPE and SentencePiece: a piece without the space marker (Ġ, ▁) that starts with a
        letter or digit continues a piece that ends with one, so "terpus." is the word
        "terpus" and the word ".". Special tokens are words of their own."""
        pieces = [p or "" for p in self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))]
        special = set(self.hf.all_special_ids)
        if any(p.startswith("##") for p in pieces):
            continues = [p.startswith("##") and i not in special for i, p in enumerate(pieces)]
            joins = [i not in special for i in range(len(pieces))]
        else:
            uses = {m: sum(len(p) > 1 and p.startswith(m) for p in pieces) for m in ("\u0120", "\u2581")}  # Ġ, ▁
            marker = max(uses, key=uses.get)
            if not uses[marker]:
                raise ValueError(f"cannot tell where words start in the tokenizer {type(self.hf).__name__}: it is "
                                 "neither WordPiece (##) nor marks spaces (Ġ, ▁); use pool: token")
            continues = [i not in special and p[:1].isalnum() and not p.startswith(marker) for i, p in enumerate(pieces)]
            joins = [i not in special and p[-1:].isalnum() for i, p in enumerate(pieces)]
        return torch.tensor(continues), torch.tensor(joins)


def _first_id(*candidates: int | None) -> int:
    for c in candidates:
        if c is not None:
            return int(c)
    raise ValueError("the tokenizer defines none of bos/cls/eos/sep tokens; the reasoner needs one")
