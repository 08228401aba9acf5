"""On-disk cache of memory states: the frozen backbone reads each data set once.

A cache entry is a directory keyed by the backbone fingerprint and a hash of the exact
token ids it read. It holds the states of every real (non-padding) token, concatenated
into one memory-mapped float32 array, plus row offsets and a manifest. Entries are
written to a temporary directory and renamed into place, so a crash or a second process
never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from split_model.memory.backbone import HFMemory, pad_batch

FORMAT_VERSION = 1


@dataclass
class CachedStates:
    """Memory states of one data set, memory-mapped read-only."""

    states: np.ndarray  # (total_tokens, S, D) float32
    offsets: np.ndarray  # (n_rows + 1,) int64: row i is states[offsets[i]:offsets[i+1]]
    path: Path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        """(N_i, S, D) states of row i, copied out of the map."""
        return torch.from_numpy(np.array(self.states[self.offsets[i] : self.offsets[i + 1]]))


class MemoryCache:
    """Computes memory states once per (backbone, inputs) and reuses them from disk."""

    def __init__(self, root: str | Path, memory: HFMemory, batch_size: int = 32):
        self.root = Path(root)
        self.memory = memory
        self.batch_size = batch_size

    def key(self, token_ids: list[list[int]]) -> str:
        h = hashlib.sha256(f"v{FORMAT_VERSION}:{self.memory.fingerprint}".encode())
        for ids in token_ids:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:24]

    def get(self, texts: list[str], desc: str = "memory") -> CachedStates:
        """States for `texts`, computed by the backbone only if no entry exists."""
        if not texts:
            raise ValueError(f"cannot cache memory states of an empty data set ({desc})")
        ids = [self.memory.tokenizer.encode_context(t, self.memory.max_length) for t in texts]
        path = self.root / self.memory.fingerprint[:16] / self.key(ids)
        if not (path / "manifest.json").exists():
            self._build(ids, path, desc)
        return _open(path, expected_rows=len(ids))

    def _build(self, ids: list[list[int]], path: Path, desc: str) -> None:
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shape = (int(offsets[-1]), self.memory.num_states, self.memory.hidden_size)
        out = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=np.float32, shape=shape)
        order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for rows in tqdm(batches, desc=f"encoding {desc} with the memory", file=sys.stderr, leave=False):
            input_ids, mask = pad_batch([ids[r] for r in rows], self.memory.tokenizer.pad_id)
            states = self.memory.encode(input_ids, mask).states.cpu().numpy()
            for j, r in enumerate(rows):
                out[offsets[r] : offsets[r + 1]] = states[j, : lengths[r]]
        out.flush()
        del out
        np.save(tmp / "offsets.npy", offsets)
        manifest = {"version": FORMAT_VERSION, "fingerprint": self.memory.fingerprint, "rows": len(ids),
                    "tokens": shape[0], "num_states": shape[1], "hidden_size": shape[2]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)


def _open(path: Path, expected_rows: int) -> CachedStates:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        states = np.load(path / "states.npy", mmap_mode="r")
        offsets = np.load(path / "offsets.npy")
        ok = (
            manifest.get("version") == FORMAT_VERSION
            and manifest["rows"] == expected_rows == len(offsets) - 1
            and states.shape == (manifest["tokens"], manifest["num_states"], manifest["hidden_size"])
            and offsets[-1] == states.shape[0]
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"memory cache entry {path} is unreadable ({e}); delete that directory to rebuild it") from e
    if not ok:
        raise ValueError(f"memory cache entry {path} is inconsistent with its manifest; delete it to rebuild it")
    return CachedStates(states=states, offsets=offsets, path=path)
