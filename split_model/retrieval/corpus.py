"""From a corpus file to the chunks a retrieval store holds.

A corpus is JSON Lines (`.jsonl` / `.json`: one object with a `text` field per line) or plain
text (one document per line). Each document is tokenized as the memory reads a context (its
special tokens included) and, when longer than `chunk_tokens`, split into consecutive
chunks of at most that many token ids (so of a split document only the first chunk holds
the backbone's leading special tokens and only the last its closing ones). It is never cut
at the memory's `max_length`: a long document just becomes more chunks. The usual corpus
has one fact per document, so one chunk per document.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from split_model.memory.backbone import HFMemory

JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class Chunk:
    ids: list[int]  # token ids the memory reads, at most chunk_tokens of them
    doc: int  # index of the document it comes from
    text: str  # the document itself when it is one chunk, else the chunk's decoded tokens


def read_corpus(path: str | Path) -> list[str]:
    """The documents of a corpus file; blank lines are skipped. ValueError names the line
    of a malformed JSON Lines entry, or says the file holds no document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}: pass a .jsonl file with a `text` field per line, "
                                "or a text file with one document per line")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() in JSON_SUFFIXES:
        docs = [_json_text(line, n, path) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        docs = [line.strip() for line in lines if line.strip()]
    if not docs:
        raise ValueError(f"the corpus {path} holds no document: write one document per line")
    return docs


def _json_text(line: str, n: int, path: Path) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {n} of {path} is not valid JSON ({e.msg}): a {path.suffix} corpus holds one "
                         "JSON object per line (JSON Lines); name the file .txt for plain text") from None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"line {n} of {path} has no non-empty string `text` field: every line of a JSON Lines "
                         'corpus must look like {"text": "..."}')
    return text


def chunk_documents(memory: HFMemory, texts: Sequence[str], chunk_tokens: int, first_doc: int = 0) -> list[Chunk]:
    """The chunks of `texts`, in order; documents are numbered from `first_doc`."""
    chunks = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"document {first_doc + i} is a {type(text).__name__}, not a string")
        # No cut at max_length: a long document is split below, not truncated.
        ids, _ = memory.tokenizer.encode_context_and_length(text, sys.maxsize)
        if not ids:
            raise ValueError(f"document {first_doc + i} ({text!r}) has no tokens: remove empty documents")
        if len(ids) <= chunk_tokens:
            chunks.append(Chunk(ids=ids, doc=first_doc + i, text=text))
            continue
        for start in range(0, len(ids), chunk_tokens):
            piece = ids[start : start + chunk_tokens]
            chunks.append(Chunk(ids=piece, doc=first_doc + i, text=memory.tokenizer.decode(piece)))
    return chunks
