"""The retrieval store: a corpus read once by the frozen memory, searched by key at every step.

Built once from a corpus by `RetrievalStore.build` (or `split-model index`), reopened
memory-mapped and read-only by `RetrievalStore.open`. Per chunk it holds
- a key: the mean over the chunk's tokens of the last selected memory layer's states
  (`key_layers: last`), or of every selected layer's, each layer's mean L2-normalised
  before the layers are averaged (`key_layers: all`); L2-normalised for the ip metric,
  stored fp16 in `keys.npy` and indexed by faiss in `index.faiss` (see index.py for the kinds);
- a value: the chunk's token states of every selected layer, (chunk_tokens, S, D) fp16,
  zero-padded, in `values.npy`, with the real lengths in `lengths.npy`;
- its text and document index, one JSON line each in `chunks.jsonl`.
`manifest.json` records the backbone (name and fingerprint), the dimensions, the counts, the
index spec, and the size and sha256 of every other file. Files up to 256 MiB are hashed
whole; a larger one (the values of a big corpus, a big flat index) is hashed by its size
and 64 evenly spaced 1 MiB blocks, first and last included, so opening a 200k-chunk store
reads 64 MiB of it instead of gigabytes. The sizes catch truncation either way.

A build writes everything into a hidden temporary directory next to the target and renames
it into place at the end: a killed build leaves no half store at the target. `append`
adds a part (`keys.1.npy`, `values.1.npy`, ...) and a new index file under names the
current manifest does not reference, then replaces the manifest atomically (the commit
point) and removes the old index file: a killed append leaves the store as it was. One
writer at a time.

`open` refuses, with one sentence saying what to do, a missing directory, an unreadable
manifest, a missing, truncated or damaged file, arrays whose shapes disagree with the
manifest, an index whose size disagrees with it, and (given the memory) a store written by
another backbone or for other dimensions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import warnings
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from split_model import files
from split_model.memory.backbone import HFMemory, encode_dtype, pad_batch
from split_model.memory.cache import token_batches
from split_model.retrieval import index as faiss_index
from split_model.retrieval.corpus import Chunk, chunk_documents
from split_model.retrieval.index import IndexSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FULL_HASH_BYTES = 256 * 2**20  # larger files are hashed by sampled blocks
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 2**20
MAX_ROWS = 1024  # chunks per encoding batch, however short
FP16_MAX = float(np.finfo(np.float16).max)
REBUILD = "rebuild the store with `split-model index`"
KEY_LAYERS = ("last", "all")  # what a chunk's key averages: the last stored layer, or every stored layer
_REQUIRED = {"format": int, "backbone": str, "fingerprint": str, "layers": list, "hidden_size": int,
             "num_states": int, "key_dim": int, "chunk_tokens": int, "num_chunks": int, "num_documents": int,
             "index": dict, "metric": str, "created": str, "index_file": str, "parts": list, "files": dict}


class RetrievalStore:
    """Chunks of a corpus as faiss-indexed keys and memory-mapped memory states.

    Make one with `build`, reopen it with `open`; the constructor is internal.
    """

    def __init__(self, path: Path, manifest: dict, spec: IndexSpec, index, keys: list[np.ndarray],
                 values: list[np.ndarray], lengths: np.ndarray):
        self.path, self.manifest, self.spec, self._index = path, manifest, spec, index
        self._keys, self._values, self._lengths = keys, values, lengths  # per part; lengths concatenated
        self._starts = np.cumsum([0] + [len(k) for k in keys])[:-1]  # first chunk id of each part
        self._texts: list[str] | None = None
        self._by_text: dict[str, int] | None = None
        self._scratch = torch.empty(0)  # see _widen

    # -- shape of the store ------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return self.manifest["num_chunks"]

    @property
    def num_documents(self) -> int:
        return self.manifest["num_documents"]

    @property
    def key_dim(self) -> int:
        return self.manifest["key_dim"]

    @property
    def key_layers(self) -> str:
        """What a key averages: "last" (the last stored layer) or "all" (every stored layer)."""
        return self.manifest.get("key_layers", "last")  # stores written before the choice existed: last

    @property
    def chunk_tokens(self) -> int:
        """Token slots per chunk in `values` (T)."""
        return self.manifest["chunk_tokens"]

    @property
    def num_states(self) -> int:
        """S: memory layers stored per token."""
        return self.manifest["num_states"]

    @property
    def hidden_size(self) -> int:
        """D: the memory's width."""
        return self.manifest["hidden_size"]

    def __len__(self) -> int:
        return self.num_chunks

    def __repr__(self) -> str:
        return (f"RetrievalStore({str(self.path)!r}, {self.num_chunks} chunks, key_dim={self.key_dim}, "
                f"index={self.spec.kind}/{self.spec.metric})")

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | Path, memory: HFMemory, texts: Sequence[str], *, index: IndexSpec = IndexSpec(),
              chunk_tokens: int = 32, tokens_per_batch: int = 8192, desc: str = "corpus",
              seed: int = 0, key_layers: str = "last") -> "RetrievalStore":
        """Encode `texts` with `memory` (on its device, in `encode_dtype` of it) and write a store
        at `path`, which must not exist (or be an empty directory). `seed` draws the training
        sample of an ivfpq index. `key_layers`: "last" keys a chunk by the mean of the last
        stored layer's token states; "all" by every stored layer's (each layer's mean
        normalised, then averaged), so that a store reading the embeddings and the last layer
        (layers 0 and -1) has keys that match a word itself as well as its sentence."""
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise ValueError(f"{path} already exists: choose another directory, delete it, or add to the store "
                             "there with `split-model index --append`")
        _check_sizes(memory, chunk_tokens, tokens_per_batch)
        if key_layers not in KEY_LAYERS:
            raise ValueError(f"key_layers must be one of {', '.join(KEY_LAYERS)}, got {key_layers!r}")
        index.check_dim(memory.hidden_size)  # before the long encoding, not after
        texts = list(texts)
        if not texts:
            raise ValueError(f"cannot build a retrieval store from an empty corpus ({desc})")
        chunks = chunk_documents(memory, texts, chunk_tokens)
        tmp = files.temporary_name(path)
        tmp.mkdir(parents=True)
        try:
            part = _part_names(0)
            keys = _write_part(tmp, part, memory, chunks, chunk_tokens, index.metric, tokens_per_batch, desc,
                               key_layers)
            built, spec = faiss_index.build_index(keys, index, seed)
            faiss_index.write_index(built, tmp / "index.faiss")
            now = _now()
            manifest = {
                "format": FORMAT_VERSION, "backbone": backbone_name(memory), "fingerprint": memory.fingerprint,
                "layers": list(memory.layers), "hidden_size": memory.hidden_size, "num_states": memory.num_states,
                "key_dim": memory.hidden_size, "key_layers": key_layers, "chunk_tokens": chunk_tokens,
                "num_chunks": len(chunks), "num_documents": len(texts), "index": asdict(spec), "metric": spec.metric,
                "created": now, "updated": now, "index_file": "index.faiss", "parts": [{"chunks": len(chunks), **part}],
                "files": {name: _digest(tmp / name) for name in [*part.values(), "index.faiss"]},
            }
            files.write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if path.exists():
                path.rmdir()  # the empty directory checked above
            tmp.rename(path)
        except BaseException:
            files.remove(tmp)
            raise
        return cls.open(path, memory)

    def append(self, memory: HFMemory, texts: Sequence[str]) -> None:
        """Encode `texts` with `memory` (the backbone that built the store) and add their
        chunks; their documents are numbered after the store's. Earlier chunks keep their ids."""
        self.check_memory(memory)
        texts = list(texts)
        if not texts:
            raise ValueError("nothing to append: the corpus is empty")
        chunks = chunk_documents(memory, texts, self.chunk_tokens, first_doc=self.num_documents)
        n_part = len(self.manifest["parts"])
        part = _part_names(n_part)
        keys = _write_part(self.path, part, memory, chunks, self.chunk_tokens, self.spec.metric, 8192,
                           "appended corpus", self.key_layers)
        grown = faiss_index.read_index(self.path / self.manifest["index_file"], self.spec, mmap=False)
        grown.add(keys)
        index_file = f"index.{n_part}.faiss"
        faiss_index.write_index(grown, self.path / index_file)
        manifest = copy.deepcopy(self.manifest)
        old_index = manifest["index_file"]
        del manifest["files"][old_index]
        manifest["files"].update({name: _digest(self.path / name) for name in [*part.values(), index_file]})
        manifest["parts"].append({"chunks": len(chunks), **part})
        manifest.update(num_chunks=self.num_chunks + len(chunks), num_documents=self.num_documents + len(texts),
                        index_file=index_file, updated=_now())
        files.write_text(self.path / MANIFEST, json.dumps(manifest, indent=1))  # the commit point
        files.remove(self.path / old_index)  # a reader that has it mapped keeps reading it
        self.__dict__.update(RetrievalStore.open(self.path, memory).__dict__)

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, memory: HFMemory | None = None) -> "RetrievalStore":
        """The store at `path`, checked (see the module docstring), memory-mapped read-only.
        With `memory`, a store written by another backbone is refused."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no retrieval store at {path}: build one with "
                                    f"`split-model index --corpus FILE --out {path}`")
        manifest = _read_manifest(path)
        if memory is not None:
            _check_backbone(path, manifest, memory)
        try:
            spec = IndexSpec(**manifest["index"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"the index spec in {path / MANIFEST} is invalid ({e}): {REBUILD}") from None
        _check_files(path, manifest)
        keys, values, lengths = _load_parts(path, manifest)
        index = faiss_index.read_index(path / manifest["index_file"], spec)
        if index.ntotal != manifest["num_chunks"] or index.d != manifest["key_dim"]:
            raise ValueError(f"the index of {path} holds {index.ntotal} keys of dimension {index.d}, the manifest "
                             f"says {manifest['num_chunks']} of dimension {manifest['key_dim']}: {REBUILD}")
        if faiss_index.metric_of(index) != spec.metric:
            raise ValueError(f"the index of {path} uses the {faiss_index.metric_of(index)} metric, the manifest "
                             f"says {spec.metric}: {REBUILD}")
        return cls(path, manifest, spec, index, keys, values, lengths)

    def check_memory(self, memory: HFMemory) -> None:
        """ValueError unless `memory` is the backbone that wrote this store."""
        _check_backbone(self.path, self.manifest, memory)

    def tune(self, *, hnsw_ef_search: int | None = None, nprobe: int | None = None, refine: int | None = None) -> None:
        """Change the search-time settings of this open store (the manifest keeps the built ones)."""
        given = {"hnsw_ef_search": hnsw_ef_search, "nprobe": nprobe, "refine": refine}
        self.spec = replace(self.spec, **{k: v for k, v in given.items() if v is not None})
        faiss_index.configure(self._index, self.spec)

    # -- reading -------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor | np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, key_dim) -> scores (B, k) float32 and ids (B, k) int64, best first.

        Scores are higher for closer keys: the cosine for ip (queries are normalised here),
        minus the squared L2 distance for l2. Where fewer than k chunks qualify, ids are -1 and
        scores -inf. `exclude` (B, E) int64 lists ids never returned to row b (-1: none).
        """
        q = _as_queries(queries, self.key_dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"search k must be a positive number of chunks, got {k!r}")
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
            if exclude.ndim != 2 or exclude.shape[0] != q.shape[0]:
                raise ValueError(f"exclude must be (B={q.shape[0]}, E) chunk ids, got shape {exclude.shape}")
        if self.spec.metric == "ip":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        want = k + (0 if exclude is None else exclude.shape[1])
        refine = self.spec.kind == "ivfpq" and self.spec.refine > 0
        fetch = min(want * self.spec.refine if refine else want, self.num_chunks)
        scores, ids = faiss_index.search(self._index, q, fetch, self.spec.metric)
        if refine:
            scores = self._exact_scores(q, ids)
        if exclude is not None:
            dropped = (ids[:, :, None] == exclude[:, None, :]).any(-1)  # (B, F)
            ids, scores = np.where(dropped, -1, ids), np.where(dropped, -np.inf, scores).astype(np.float32)
        if refine or exclude is not None:
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        scores, ids = scores[:, :k], ids[:, :k]
        if ids.shape[1] < k:  # fewer chunks than k in the whole store
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)

    def keys(self, ids: np.ndarray) -> torch.Tensor:
        """ids (...) -> the stored keys (..., key_dim) float32; zeros for id -1."""
        ids = np.asarray(ids, dtype=np.int64)
        # Copy the fp16 rows out, then widen in torch: numpy's fp16 conversion is slower.
        return torch.from_numpy(self._gather(self._keys, ids.reshape(-1))).float().view(*ids.shape, self.key_dim)

    def values(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (...) -> states (..., chunk_tokens, S, D) float32 and mask (..., chunk_tokens)
        bool (True: a real token). Id -1 gives zero states and an all-False mask."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        states = torch.from_numpy(self._gather(self._values, flat)).float()
        lengths = np.where(flat >= 0, self._lengths[np.maximum(flat, 0)], 0)
        mask = torch.arange(self.chunk_tokens)[None, :] < torch.from_numpy(lengths)[:, None]
        shape = (*ids.shape, self.chunk_tokens)
        return states.view(*shape, self.num_states, self.hidden_size), mask.view(shape)

    def text(self, i: int) -> str:
        """The text of chunk i: its document, or for a document split in several chunks, the
        chunk's decoded tokens."""
        texts = self._load_texts()
        if not 0 <= i < len(texts):
            raise IndexError(f"chunk id {i} is out of range: the store holds {len(texts)} chunks")
        return texts[i]

    def find(self, text: str) -> int | None:
        """Id of the first chunk whose text is exactly `text` (whitespace-normalised), or None."""
        if self._by_text is None:
            by_text: dict[str, int] = {}
            for i, t in enumerate(self._load_texts()):
                by_text.setdefault(_normalise(t), i)
            self._by_text = by_text
        return self._by_text.get(_normalise(text))

    def _load_texts(self) -> list[str]:
        if self._texts is None:
            texts = []
            for part in self.manifest["parts"]:
                with open(self.path / part["texts"], encoding="utf-8") as f:
                    texts += [json.loads(line)["text"] for line in f]
            self._texts = texts
        return self._texts

    def _gather(self, arrays: list[np.ndarray], flat: np.ndarray) -> np.ndarray:
        """Rows `flat` (n,) of the per-part arrays, as if they were one; zeros for -1."""
        if flat.size and (flat.max() >= self.num_chunks or flat.min() < -1):
            bad = flat[(flat >= self.num_chunks) | (flat < -1)][0]
            raise IndexError(f"chunk id {bad} is out of range: the store holds {self.num_chunks} chunks (-1: none)")
        valid = flat >= 0
        if len(arrays) == 1:
            out = np.take(arrays[0], np.maximum(flat, 0), axis=0)
            if not valid.all():
                out[~valid] = 0
            return out
        out = np.zeros((len(flat), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        part = np.searchsorted(self._starts, flat, side="right") - 1
        for p, array in enumerate(arrays):
            rows = valid & (part == p)
            out[rows] = array[flat[rows] - self._starts[p]]
        return out

    def _exact_scores(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(B, F) scores of the candidates `ids` against queries q (B, d) with the stored keys."""
        keys = self._widen(self._gather(self._keys, ids.reshape(-1))).reshape(*ids.shape, -1)  # (B, F, d)
        if self.spec.metric == "ip":
            scores = np.matmul(keys, q[:, :, None])[..., 0]
        else:
            scores = -((keys - q[:, None, :]) ** 2).sum(-1)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    def _widen(self, half: np.ndarray) -> np.ndarray:
        """fp16 rows as fp32, in a buffer reused by the next call (so not for concurrent
        searches): widening into fresh memory costs more in page faults than the conversion."""
        if self._scratch.numel() < half.size:
            self._scratch = torch.empty(half.size)
        out = self._scratch[: half.size].view(half.shape)
        out.copy_(torch.from_numpy(half))
        return out.numpy()


# -- writing a part -----------------------------------------------------------------------------
def _part_names(p: int) -> dict[str, str]:
    """File names of part p: keys.npy, ... for the first, keys.1.npy, ... after appends."""
    tag = "" if p == 0 else f".{p}"
    return {"keys": f"keys{tag}.npy", "values": f"values{tag}.npy", "lengths": f"lengths{tag}.npy",
            "texts": f"chunks{tag}.jsonl"}


def _write_part(root: Path, names: dict[str, str], memory: HFMemory, chunks: list[Chunk], chunk_tokens: int,
                metric: str, tokens_per_batch: int, desc: str, key_layers: str) -> np.ndarray:
    """Encode `chunks` and write their files; returns their keys (n, D) float32 as stored
    (rounded to fp16), which is what the faiss index must hold."""
    n, shape = len(chunks), (memory.num_states, memory.hidden_size)
    lengths = np.array(memory.state_lengths([c.ids for c in chunks]), dtype=np.int32)  # tokens, or words
    values = np.lib.format.open_memmap(root / names["values"], mode="w+", dtype=np.float16,
                                       shape=(n, chunk_tokens, *shape))
    keys = np.zeros((n, memory.hidden_size), dtype=np.float32)
    tokens = np.array([len(c.ids) for c in chunks], dtype=np.int32)  # batches are sized by what the backbone reads
    _encode(memory, [c.ids for c in chunks], tokens, values, keys, tokens_per_batch, desc, key_layers)
    values.flush()
    del values
    if metric == "ip":
        keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    keys16 = keys.astype(np.float16)
    np.save(root / names["keys"], keys16)
    np.save(root / names["lengths"], lengths)
    with open(root / names["texts"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"doc": c.doc, "text": c.text}, ensure_ascii=False) + "\n" for c in chunks)
    return keys16.astype(np.float32)


@torch.no_grad()
def _encode(memory: HFMemory, ids: list[list[int]], lengths: np.ndarray, values: np.ndarray, keys: np.ndarray,
            tokens_per_batch: int, desc: str, key_layers: str) -> None:
    """Fills values (n, T, S, D) fp16 and keys (n, D) fp32, batch by batch, longest chunks first."""
    device = memory.device
    dtype = encode_dtype(device)
    clamped = 0
    bar = tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc=f"encoding {desc} with the memory",
               file=sys.stderr, leave=False)
    with bar:
        for rows in token_batches(lengths, tokens_per_batch, MAX_ROWS):
            input_ids, mask = pad_batch([ids[r] for r in rows], memory.tokenizer.pad_id)
            read = memory.encode(input_ids.to(device), mask.to(device), dtype)
            states = read.states  # (B, N, S, D) fp32: N tokens, or words (pool: word)
            real = read.mask[:, :, None, None].to(states.dtype)  # (B, N, 1, 1)
            states = states * real  # zero padding, in the stored values and in the key's sum
            mean = states.sum(1) / real.sum(1)  # (B, S, D): each layer's mean over real tokens
            if key_layers == "last":
                key = mean[:, -1]
            else:  # layers differ in scale (embeddings vs the last layer): each counts as much
                key = torch.nn.functional.normalize(mean, dim=-1).mean(1)
            if not bool(torch.isfinite(key).all()):
                raise ValueError(f"the memory produced non-finite states while encoding {desc} in {dtype}: "
                                 "encode in float32 (on the CPU) or check the backbone's weights")
            clamped += int((states.abs() > FP16_MAX).sum())
            values[rows, : states.shape[1]] = states.clamp(-FP16_MAX, FP16_MAX).half().cpu().numpy()
            keys[rows] = key.cpu().numpy()
            bar.update(int(lengths[rows].sum()))
    if clamped:
        warnings.warn(f"{clamped:,} memory state values of {desc} exceed float16's range and were clamped to "
                      f"+-{FP16_MAX:.0f} in the retrieval store", stacklevel=4)


# -- checking -----------------------------------------------------------------------------------
def backbone_name(memory: HFMemory) -> str:
    """How the manifest and error messages name a backbone."""
    if memory.spec.get("name"):
        return str(memory.spec["name"])
    return f"inline config ({memory.spec['config'].get('model_type', '?')}, seed {memory.spec['seed']})"


def _check_sizes(memory: HFMemory, chunk_tokens: int, tokens_per_batch: int) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 1 <= chunk_tokens <= memory.max_length:
        raise ValueError(f"chunk_tokens must be in 1..{memory.max_length} (the memory's max_length), got "
                         f"{chunk_tokens!r}: set --chunk-tokens to at most {memory.max_length}")
    if isinstance(tokens_per_batch, bool) or not isinstance(tokens_per_batch, int) or tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be a positive number of tokens, got {tokens_per_batch!r}")


def _check_backbone(path: Path, manifest: dict, memory: HFMemory) -> None:
    ours = {"hidden_size": memory.hidden_size, "num_states": memory.num_states, "layers": list(memory.layers)}
    for name, value in ours.items():
        if manifest[name] != value:
            raise ValueError(f"the store {path} holds memory states with {name}={manifest[name]}, this memory has "
                             f"{name}={value}: use the backbone that built it ({manifest['backbone']}) or build a "
                             "store with this one (`split-model index --memory ...`)")
    if manifest["fingerprint"] != memory.fingerprint:
        raise ValueError(f"the store {path} was built by the backbone {manifest['backbone']} (fingerprint "
                         f"{manifest['fingerprint'][:12]}), not by this memory, {backbone_name(memory)} (fingerprint "
                         f"{memory.fingerprint[:12]}): use that backbone or build a store with this one")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {MANIFEST}, so it is not a retrieval store (or its build did not "
                                f"finish): {REBUILD}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / MANIFEST} is unreadable ({e}): {REBUILD}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path / MANIFEST} holds a JSON {type(manifest).__name__}, not an object: {REBUILD}")
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(manifest.get(k), t) or isinstance(manifest.get(k), bool)]
    if wrong:
        raise ValueError(f"{path / MANIFEST} lacks or mistypes the fields {', '.join(wrong)}: {REBUILD}")
    if manifest.get("key_layers", "last") not in KEY_LAYERS:
        raise ValueError(f"{path / MANIFEST} names key_layers {manifest['key_layers']!r}, not one of "
                         f"{', '.join(KEY_LAYERS)}: {REBUILD}")
    if manifest["format"] != FORMAT_VERSION:
        raise ValueError(f"the store {path} has format {manifest['format']}, this code reads {FORMAT_VERSION}: {REBUILD}")
    return manifest


def _check_files(path: Path, manifest: dict) -> None:
    """Every file the manifest names is there, of its recorded size and checksum."""
    needed = [manifest["index_file"], *(name for part in manifest["parts"] for key, name in part.items() if key != "chunks")]
    unlisted = [name for name in needed if name not in manifest["files"]]
    if unlisted:
        raise ValueError(f"{path / MANIFEST} records no size or checksum for {', '.join(unlisted)}: {REBUILD}")
    for name, want in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the retrieval store: {REBUILD}")
        size = file.stat().st_size
        if size != want.get("bytes"):
            raise ValueError(f"{file} is {size:,} bytes, the manifest says {want.get('bytes'):,}: the file is "
                             f"truncated or was replaced; {REBUILD}")
        if _digest(file)["sha256"] != want.get("sha256"):
            raise ValueError(f"{file} does not match its checksum in the manifest: the file is damaged; {REBUILD}")


def _load_parts(path: Path, manifest: dict) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    keys, values, lengths = [], [], []
    want_values = (manifest["chunk_tokens"], manifest["num_states"], manifest["hidden_size"])
    for part in manifest["parts"]:
        n = part.get("chunks")
        try:
            k = np.load(path / part["keys"], mmap_mode="r")
            v = np.load(path / part["values"], mmap_mode="r")
            ln = np.load(path / part["lengths"])
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"a part of the store {path} is unreadable ({e}): {REBUILD}") from None
        checks = [(k.shape == (n, manifest["key_dim"]) and k.dtype == np.float16, part["keys"], k),
                  (v.shape == (n, *want_values) and v.dtype == np.float16, part["values"], v),
                  (ln.shape == (n,) and ln.dtype.kind == "i" and (n == 0 or (ln.min() >= 1 and
                                                                          ln.max() <= want_values[0])), part["lengths"], ln)]
        for ok, name, array in checks:
            if not ok:
                raise ValueError(f"{path / name} holds a {array.dtype} array of shape {array.shape}, which disagrees "
                                 f"with the manifest ({n} chunks, chunk_tokens={want_values[0]}, states "
                                 f"{want_values[1:]}, key_dim={manifest['key_dim']}): {REBUILD}")
        keys.append(k)
        values.append(v)
        lengths.append(ln)
    if sum(len(k) for k in keys) != manifest["num_chunks"]:
        raise ValueError(f"the parts of {path} hold {sum(len(k) for k in keys)} chunks, the manifest says "
                         f"{manifest['num_chunks']}: {REBUILD}")
    return keys, values, np.concatenate(lengths)


def _digest(file: Path) -> dict:
    """Size and sha256 of a file: of all of it up to FULL_HASH_BYTES, else of its size and
    SAMPLED_BLOCKS evenly spaced blocks (the first and the last among them)."""
    size = file.stat().st_size
    h = hashlib.sha256()
    with open(file, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while block := f.read(16 * BLOCK_BYTES):
                h.update(block)
            return {"bytes": size, "sha256": h.hexdigest(), "hashed": "whole"}
        h.update(str(size).encode())
        for start in np.linspace(0, size - BLOCK_BYTES, SAMPLED_BLOCKS).astype(np.int64):
            f.seek(int(start))
            h.update(f.read(BLOCK_BYTES))
    return {"bytes": size, "sha256": h.hexdigest(), "hashed": f"{SAMPLED_BLOCKS} blocks of {BLOCK_BYTES} bytes"}


def _as_queries(queries: torch.Tensor | np.ndarray, key_dim: int) -> np.ndarray:
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().float().cpu().numpy()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != key_dim:
        raise ValueError(f"queries must be (B, key_dim={key_dim}), got shape {q.shape}")
    return q


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
