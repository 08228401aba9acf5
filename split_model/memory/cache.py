"""On-disk cache of memory states: the frozen backbone reads each data set once.

A cache entry is a directory keyed by the backbone fingerprint, the precision it computed
in, and a hash of the exact token ids it read. It holds the states of every real
(non-padding) token, concatenated into one memory-mapped float16 array (half the disk of
fp32; rows are read back as fp32), plus row offsets and a manifest. The backbone encodes on
the device it is given, longest rows first, in batches of about `tokens_per_batch` padded
tokens. Entries are written to a temporary directory and renamed into place, so a crash or
a second process never leaves a half-written entry behind, and a process that must not
encode can `wait` for another one's entry by watching the file system. An entry that fails
its checks when opened (a damaged file, a manifest that disagrees with its data) is moved
aside and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from split_model import files
from split_model.memory.backbone import EncodeDtype, HFMemory, encode_dtype, pad_batch

FORMAT_VERSION = 2  # 2: float16 states, precision in the key (1 was float32)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: larger states are clamped to it


@dataclass
class CachedStates:
    """Memory states of one data set, memory-mapped read-only."""

    states: np.ndarray  # (total_tokens, S, D) float16
    offsets: np.ndarray  # (n_rows + 1,) int64: row i is states[offsets[i]:offsets[i+1]]
    path: Path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        """(N_i, S, D) float32 states of row i, copied out of the map (the reasoner computes in fp32)."""
        # Copy the fp16 bytes out, then widen in torch: numpy's fp16 conversion is ~3x slower.
        return torch.from_numpy(np.array(self.states[self.offsets[i] : self.offsets[i + 1]])).float()


def token_batches(lengths: np.ndarray, tokens_per_batch: int, max_rows: int) -> list[np.ndarray]:
    """Row indices, longest first, in batches of at most `tokens_per_batch` padded tokens.

    Sorting puts similar lengths together, so the first (longest) row of a batch sets its
    padded width. A row longer than the budget gets a batch of its own; `max_rows` caps
    batches of very short rows.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        rows = min(max_rows, max(1, tokens_per_batch // max(1, int(lengths[order[i]]))))
        batches.append(order[i : i + rows])
        i += rows
    return batches


class MemoryCache:
    """Computes memory states once per (backbone, precision, inputs) and reuses them from disk.

    Args:
        root: directory of the entries.
        memory: the frozen backbone.
        tokens_per_batch: padded tokens per encoding batch (rows x longest row).
        max_rows: most rows per encoding batch, however short they are.
        device: where to encode; the backbone is moved there for the encoding and back
            afterwards. None: where the backbone is.
        dtype: precision of the encoding: auto (bf16 on CUDA where supported, else fp16 on
            CUDA, fp32 elsewhere), float32, bfloat16 or float16. It is part of the key:
            states computed differently are a different entry.
    """

    def __init__(self, root: str | Path, memory: HFMemory, *, tokens_per_batch: int = 16384, max_rows: int = 512,
                 device: torch.device | str | None = None, dtype: EncodeDtype = "auto"):
        if tokens_per_batch <= 0 or max_rows <= 0:
            raise ValueError(f"tokens_per_batch and max_rows must be positive, got {tokens_per_batch} and {max_rows}")
        self.root = Path(root)
        self.memory = memory
        self.tokens_per_batch, self.max_rows = tokens_per_batch, max_rows
        self.device = torch.device(device) if device is not None else memory.device
        self.dtype = encode_dtype(self.device, dtype)

    def key(self, token_ids: list[list[int]]) -> str:
        """Hash of everything the states depend on: the format, the backbone's weights and
        layer choice (its fingerprint), the precision, the code that extracts the states, and
        the exact token ids read (so the data, the tokenizer and max_length)."""
        h = hashlib.sha256(f"v{FORMAT_VERSION}:{self.memory.fingerprint}:{self.dtype}:{extraction_code()}".encode())
        for ids in token_ids:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:24]

    def get(self, texts: list[str], desc: str = "memory") -> CachedStates:
        """States for `texts`, computed by the backbone only if no entry exists. An entry
        that fails its checks (a damaged file, a manifest that disagrees with the data or
        the backbone) is moved aside under a `.damaged-` name, with a warning, and rebuilt."""
        ids, path = self._entry(texts, desc)
        if path.exists():
            try:
                return _open(path, expected_rows=len(ids), fingerprint=self.memory.fingerprint)
            except ValueError as e:
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                path.rename(aside)
                warnings.warn(f"{e}; it was moved to {aside} and is rebuilt", stacklevel=2)
        self._build(ids, path, desc)
        return _open(path, expected_rows=len(ids), fingerprint=self.memory.fingerprint)

    def wait(self, texts: list[str], desc: str = "memory", timeout_s: float = 600.0,
             poll_s: float = 1.0) -> CachedStates:
        """States for `texts` once another process has built them; never runs the backbone.

        Entries appear by an atomic rename, so polling the file system is enough, and unlike
        a collective barrier it cannot hit a process-group timeout.
        """
        ids, path = self._entry(texts, desc)
        deadline = time.monotonic() + timeout_s
        while not (path / "manifest.json").exists():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"memory states of {desc} did not appear at {path} within {timeout_s:g} s. They are "
                    "written by the process that runs prepare_data (local rank 0 of each node): look there "
                    "for an error. If the nodes do not share this directory, keep prepare_data_per_node=True; "
                    "if encoding is just slow, raise the wait (TaskDataModule cache_wait_s)."
                )
            time.sleep(min(poll_s, left))
        try:
            return _open(path, expected_rows=len(ids), fingerprint=self.memory.fingerprint)
        except ValueError as e:  # rebuilding is the writing process's job (`get`)
            raise ValueError(f"{e}: delete that directory to have it rebuilt") from e

    def _entry(self, texts: list[str], desc: str) -> tuple[list[list[int]], Path]:
        if not texts:
            raise ValueError(f"cannot cache memory states of an empty data set ({desc})")
        ids = self.memory.context_ids(texts, desc)  # the memory's long_inputs policy applies here
        return ids, self.root / self.memory.fingerprint[:16] / self.key(ids)

    def _build(self, ids: list[list[int]], path: Path, desc: str) -> None:
        tmp = files.temporary_name(path)  # unique across processes and hosts sharing the directory
        tmp.mkdir(parents=True)
        try:
            self._write(tmp, ids, desc)
        except BaseException:
            files.remove(tmp)  # a failed encoding leaves nothing behind
            raise
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same entry first
            files.remove(tmp)
    def _write(self, tmp: Path, ids: list[list[int]], desc: str) -> None:
        """states.npy, offsets.npy and manifest.json of an entry, into `tmp`."""
        # Row i holds state_lengths(ids)[i] states: its tokens, or its words (pool: word).
        offsets = np.concatenate([[0], np.cumsum(self.memory.state_lengths(ids))]).astype(np.int64)
        shape = (int(offsets[-1]), self.memory.num_states, self.memory.hidden_size)
        out = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=np.float16, shape=shape)
        with self.memory.placed_on(self.device):
            clamped, peak = self._encode_into(out, ids, offsets, desc)
        out.flush()
        del out
        np.save(tmp / "offsets.npy", offsets)
        manifest = {"version": FORMAT_VERSION, "fingerprint": self.memory.fingerprint, "rows": len(ids),
                    "tokens": shape[0], "num_states": shape[1], "hidden_size": shape[2],
                    "stored_as": "float16", "computed_in": str(self.dtype).removeprefix("torch."), "clamped": clamped}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if clamped:
            warnings.warn(f"{clamped:,} memory state values of {desc} exceed float16's range (largest |x| = "
                          f"{peak:.4g}) and were clamped to +-{FP16_MAX:.0f} in the memory cache", stacklevel=4)

    def _encode_into(self, out: np.ndarray, ids: list[list[int]], offsets: np.ndarray, desc: str) -> tuple[int, float]:
        """Fills `out` row by row; returns how many values were clamped to fp16 and the largest |x|."""
        lengths = np.diff(offsets)  # states per row
        tokens = np.array([len(x) for x in ids], dtype=np.int64)  # what the backbone reads per row
        clamped, peak = 0, 0.0
        bar = tqdm(total=int(tokens.sum()), unit="tok", unit_scale=True, desc=f"encoding {desc} with the memory",
                   file=sys.stderr, leave=False)
        with bar:
            for rows in token_batches(tokens, self.tokens_per_batch, self.max_rows):
                if tokens[rows[0]] == 0:  # only empty rows left: nothing to store
                    break
                real, n_big, big = self._encode_batch([ids[r] for r in rows], desc)
                clamped, peak = clamped + n_big, max(peak, big)
                starts = np.concatenate([[0], np.cumsum(lengths[rows])])
                if starts[-1] != len(real):
                    raise RuntimeError(f"the memory returned {len(real)} states for rows that should have {starts[-1]}")
                for j, r in enumerate(rows):
                    out[offsets[r] : offsets[r + 1]] = real[starts[j] : starts[j + 1]]
                bar.update(int(tokens[rows].sum()))
        return clamped, peak

    def _encode_batch(self, batch: list[list[int]], desc: str) -> tuple[np.ndarray, int, float]:
        """(real tokens of the batch's rows one after another, S, D) float16; clamp count; largest |x|."""
        input_ids, mask = pad_batch(batch, self.memory.tokenizer.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        read = self.memory.encode(input_ids, mask, self.dtype)
        real = read.states[read.mask]  # (tokens or words, S, D) fp32
        peak = float(real.abs().max())  # the one host sync per batch; NaN propagates into it
        if not np.isfinite(peak):
            raise ValueError(f"the memory produced non-finite states while encoding {desc} in {self.dtype}; "
                             "encode in float32 (TaskDataModule memory_dtype=float32)")
        n_big = int((real.abs() > FP16_MAX).sum()) if peak > FP16_MAX else 0
        # Narrow on the device: half the bytes to copy back to the host.
        return real.clamp(-FP16_MAX, FP16_MAX).half().cpu().numpy(), n_big, peak


def extraction_code() -> str:
    """Hash of the source of the code that turns token ids into stored states: a change to it
    makes new cache keys, so states computed by older code are never read back."""
    from split_model.memory import backbone

    parts = [backbone.HFMemory.encode, backbone.pad_batch, MemoryCache._encode_batch, MemoryCache._encode_into,
             backbone.pool_words, backbone.HFMemory.word_starts]
    try:
        source = "".join(inspect.getsource(f) for f in parts)
    except (OSError, TypeError):  # no source files (a frozen install): the format version alone
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _open(path: Path, expected_rows: int, fingerprint: str | None = None) -> CachedStates:
    """An entry, memory-mapped, after checking its manifest against its files (and the
    backbone's fingerprint when given). ValueError names what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        states = np.load(path / "states.npy", mmap_mode="r")
        offsets = np.load(path / "offsets.npy")
    except (OSError, ValueError, EOFError) as e:  # missing, truncated, or not numpy/JSON at all
        raise ValueError(f"memory cache entry {path} is unreadable ({e})") from e
    problems = _manifest_problems(manifest, states, offsets, expected_rows, fingerprint)
    if problems:
        raise ValueError(f"memory cache entry {path} is inconsistent: {'; '.join(problems)}")
    return CachedStates(states=states, offsets=offsets, path=path)


def _manifest_problems(manifest, states: np.ndarray, offsets: np.ndarray, expected_rows: int,
                       fingerprint: str | None) -> list[str]:
    if not isinstance(manifest, dict):
        return [f"the manifest is a JSON {type(manifest).__name__}, not an object"]
    want = {"version": int, "fingerprint": str, "rows": int, "tokens": int, "num_states": int, "hidden_size": int}
    wrong = [k for k, t in want.items() if not isinstance(manifest.get(k), t) or isinstance(manifest.get(k), bool)]
    if wrong:
        return [f"manifest fields missing or of the wrong type: {', '.join(wrong)}"]
    checks = [
        (manifest["version"] == FORMAT_VERSION, f"format version {manifest['version']}, expected {FORMAT_VERSION}"),
        (fingerprint is None or manifest["fingerprint"] == fingerprint, "written by another backbone"),
        (manifest["rows"] == expected_rows, f"{manifest['rows']} rows, the data set has {expected_rows}"),
        (offsets.ndim == 1 and len(offsets) == manifest["rows"] + 1, "row offsets do not match the row count"),
        (states.dtype == np.float16, f"states stored as {states.dtype}, expected float16"),
        (states.shape == (manifest["tokens"], manifest["num_states"], manifest["hidden_size"]),
         f"states of shape {states.shape}, the manifest says "
         f"{(manifest['tokens'], manifest['num_states'], manifest['hidden_size'])}"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if not problems and (offsets[0] != 0 or offsets[-1] != states.shape[0] or bool((np.diff(offsets) < 0).any())):
        problems.append("row offsets are not increasing from 0 to the number of stored tokens")
    return problems
