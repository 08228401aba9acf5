"""The faiss side of a retrieval store: which index, how it is built, read and searched.

Three kinds, one `IndexSpec`:
- flat: exact search over every key (IndexFlatIP / IndexFlatL2); memory = n * d * 4 bytes.
- hnsw: a navigable small-world graph over the full keys (IndexHNSWFlat); approximate,
  logarithmic in n, about hnsw_m * 2 * 4 bytes per key on top of the keys.
- ivfpq: keys clustered into `ivf_lists` inverted lists and compressed to `pq_m` bytes each
  (IndexIVFPQ); a query scans `nprobe` lists. Compression costs recall, so the best
  `k * refine` candidates are re-scored exactly by the store with its fp16 keys.
Indexes are read back memory-mapped (see `read_index`), so opening a store costs no RAM
for the vectors. faiss is imported here and in store.py only, and only when needed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IndexKind = Literal["flat", "hnsw", "ivfpq"]
Metric = Literal["ip", "l2"]
TRAIN_SAMPLE = 100_000  # ivfpq trains on at most this many keys
POINTS_PER_LIST = 39  # faiss's k-means wants at least 39 training points per centroid


def import_faiss():
    """faiss, with batched flat search on BLAS from 16 queries up (its default, 20, leaves
    batches of 16-19 on a slow loop)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 16
    return faiss


@dataclass
class IndexSpec:
    """How the keys of a retrieval store are indexed and searched.

    Args:
        kind: flat (exact), hnsw (graph, approximate) or ivfpq (clustered and compressed).
        metric: ip (keys and queries L2-normalised: the score is the cosine) or l2 (the score
            is minus the squared L2 distance). Either way a higher score is closer.
        hnsw_m: hnsw: neighbours per node; more is better recall, more memory, slower builds.
        hnsw_ef_search: hnsw: candidates kept while searching (at least k is used).
        ivf_lists: ivfpq: number of inverted lists; None picks about 4 * sqrt(chunks).
        pq_m: ivfpq: bytes per compressed key; must divide the key dimension.
        pq_bits: ivfpq: bits per code of each of the pq_m sub-quantizers.
        nprobe: ivfpq: lists scanned per query.
        refine: ivfpq: re-score the best k * refine candidates exactly with the stored keys
            (0: return the compressed scores).
    """

    kind: IndexKind = "flat"
    metric: Metric = "ip"
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    ivf_lists: int | None = None
    pq_m: int = 16
    pq_bits: int = 8
    nprobe: int = 16
    refine: int = 4

    def __post_init__(self):
        if self.kind not in ("flat", "hnsw", "ivfpq"):
            raise ValueError(f"index kind must be flat, hnsw or ivfpq, got {self.kind!r}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"index metric must be ip (cosine) or l2, got {self.metric!r}")
        for name, low in (("hnsw_m", 2), ("hnsw_ef_search", 1), ("pq_m", 1), ("nprobe", 1), ("refine", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"index {name} must be an integer >= {low}, got {value!r}: set {name} to one")
        if isinstance(self.pq_bits, bool) or not isinstance(self.pq_bits, int) or not 1 <= self.pq_bits <= 16:
            raise ValueError(f"index pq_bits must be an integer in 1..16, got {self.pq_bits!r}: 8 is the usual choice")
        if self.ivf_lists is not None and (isinstance(self.ivf_lists, bool) or not isinstance(self.ivf_lists, int)
                                           or self.ivf_lists < 1):
            raise ValueError(f"index ivf_lists must be a positive integer or None (about 4 * sqrt(chunks)), "
                             f"got {self.ivf_lists!r}")

    def check_dim(self, key_dim: int) -> None:
        """Refuse settings that cannot index keys of this width."""
        if self.kind == "ivfpq" and key_dim % self.pq_m:
            divisors = [m for m in (4, 8, 12, 16, 24, 32, 48, 64, 96) if key_dim % m == 0]
            raise ValueError(f"index pq_m={self.pq_m} does not divide the key dimension {key_dim}: set pq_m to a "
                             f"divisor of {key_dim}" + (f" such as {', '.join(map(str, divisors))}" if divisors else ""))


def build_index(keys: np.ndarray, spec: IndexSpec, seed: int = 0):
    """A faiss index over keys (n, d) float32, trained when the kind needs it; returns the index
    and the spec as built (ivf_lists resolved)."""
    faiss = import_faiss()
    n, d = keys.shape
    spec.check_dim(d)
    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d) if spec.metric == "ip" else faiss.IndexFlatL2(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, metric)
    else:
        spec = _resolve_lists(spec, n)
        quantizer = faiss.IndexFlatIP(d) if spec.metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, spec.ivf_lists, spec.pq_m, spec.pq_bits, metric)
        index.train(_training_sample(keys, seed))
    index.add(keys)
    configure(index, spec)
    return index, spec


def _resolve_lists(spec: IndexSpec, n: int) -> IndexSpec:
    from dataclasses import replace

    if n < 2**spec.pq_bits:
        raise ValueError(f"ivfpq with pq_bits={spec.pq_bits} needs at least {2**spec.pq_bits} chunks to train its "
                         f"codebooks, the corpus has {n}: use the flat or hnsw index, or lower pq_bits")
    lists = spec.ivf_lists if spec.ivf_lists is not None else max(1, round(4 * math.sqrt(n)))
    most = max(1, min(n, TRAIN_SAMPLE) // POINTS_PER_LIST)
    if lists > most:
        warnings.warn(f"ivfpq: {n:,} chunks are too few to train {lists:,} inverted lists ({POINTS_PER_LIST} "
                      f"training keys per list): using {most:,} lists", stacklevel=3)
        lists = most
    return replace(spec, ivf_lists=lists)


def _training_sample(keys: np.ndarray, seed: int) -> np.ndarray:
    if len(keys) <= TRAIN_SAMPLE:
        return keys
    rows = np.sort(np.random.default_rng(seed).choice(len(keys), TRAIN_SAMPLE, replace=False))
    return np.ascontiguousarray(keys[rows])


def configure(index, spec: IndexSpec) -> None:
    """Apply the search-time settings of `spec` to an index of its kind."""
    faiss = import_faiss()
    if spec.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.hnsw_ef_search
    elif spec.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = spec.nprobe


def write_index(index, path: Path) -> None:
    import_faiss().write_index(index, str(path))


def read_index(path: Path, spec: IndexSpec, *, mmap: bool = True):
    """The index at `path`, memory-mapped read-only when `mmap` (the vectors stay on disk
    and in the page cache, shared between processes), loaded whole otherwise (to add to it).

    faiss maps different things under different flags. IO_FLAG_MMAP_IFC maps the whole file
    and reads every code array from the map: flat codes, the HNSW graph and its stored keys,
    and the IVF inverted lists. IO_FLAG_MMAP maps only IVF inverted lists, through
    OnDiskInvertedLists, which cost about 0.8 ms more per search here (faiss 1.15), and flat
    and HNSW indexes ignore it (they would be read into RAM). So IO_FLAG_MMAP_IFC where faiss
    has it (1.11 and later); before that, IO_FLAG_MMAP, and flat and HNSW indexes in RAM.
    """
    faiss = import_faiss()
    flags = 0
    if mmap:
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot read the index {path} ({_first_line(e)}): the file is damaged; rebuild "
                         "the store with `split-model index`") from e
    configure(index, spec)
    return index


def metric_of(index) -> Metric:
    return "ip" if index.metric_type == import_faiss().METRIC_INNER_PRODUCT else "l2"


def search(index, queries: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """queries (B, d) float32 -> scores (B, k) float32 (higher is closer, -inf where no
    result) and ids (B, k) int64 (-1 where no result)."""
    scores, ids = index.search(queries, k)
    if metric == "l2":
        scores = -scores
    scores[ids < 0] = -np.inf
    return scores, ids


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
