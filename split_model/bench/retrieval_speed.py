"""Retrieval speed: can the reasoner search a 200k-chunk store at every step?

One process, one thread for torch and faiss. A corpus of 200k generated sentences (`--quick`:
5k) of three words from a seeded vocabulary of short random words, so that sentences share
words and their keys have neighbours, is read by a 1-block random Llama-style backbone
of width 384 (MiniLM's key width; random weights keep the build on the CPU). A random BERT
would be the obvious choice, but its mean-pooled states are nearly parallel (mean pairwise
cosine 0.93 on these sentences: every token carries the same token-type embedding), a
geometry no trained encoder has; the Llama-style block gives 0.34, near MiniLM's 0.29.

For each index kind (flat, hnsw, ivfpq) it builds a store with `RetrievalStore.build`
(encoding included, so the flat build time is the encoding's, and the others' surplus is
their index), then measures, with queries that are the keys of held-out sentences:
- recall@8 against flat search, at a few search-time settings (efSearch; nprobe and
  refine), chosen on one half of the queries and reported on the other;
- query latency at batch 1 and 64 with k=8 (medians over repeated searches);
- the share of one reasoning step spent in search: search_ms / (search_ms + step_ms),
  where step_ms is one fixed-shape step of configs/world.yaml's reasoner (d_model=128, 2
  blocks, embedding rank 32) at the same batch, cross-attending to 128 memory tokens (a
  question and 8 fetched chunks), its head scoring the tokens that config's task writes
  (`output_vocab: task`: the answers of world 0's training questions and eos), as training
  and evaluation run it; not MiniLM's 30,522 tokens, whose head would be most of the step.
Stores live in a temporary directory removed at the end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from split_model.bench import log

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ lives there

K = 8
CHUNK_TOKENS = 12  # three words of 2-3 letters and two spaces, as bytes
KEY_DIM = 384
MEMORY_TOKENS = 32 + K * CHUNK_TOKENS  # a question and K fetched chunks
GOAL_SHARE, GOAL_RECALL = 0.2, 0.95
BACKBONE = {"model_type": "llama", "hidden_size": KEY_DIM, "intermediate_size": KEY_DIM, "num_hidden_layers": 1,
            "num_attention_heads": 6, "max_position_embeddings": 32}
# Search-time settings tried, cheapest first; the first that reaches GOAL_RECALL is kept.
SWEEPS = {"flat": [{}],
          "hnsw": [{"hnsw_ef_search": ef} for ef in (8, 10, 12, 16, 24, 32, 64, 128, 256)],
          "ivfpq": [{"nprobe": n, "refine": r} for n, r in ((4, 8), (8, 8), (16, 4), (16, 8), (32, 4), (32, 8),
                                                            (64, 8), (128, 16))]}


def index_specs():
    from split_model.retrieval import IndexSpec

    return {"flat": IndexSpec("flat"), "hnsw": IndexSpec("hnsw", hnsw_m=16), "ivfpq": IndexSpec("ivfpq", pq_m=32)}


def sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences of three words drawn from 3000 random words of 2-3 letters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, size=rng.integers(2, 4))) for _ in range(3000)})
    picks = rng.integers(len(words), size=(n, 3))
    return [" ".join(words[j] for j in row) for row in picks]


def median_ms(calls) -> float:
    """Median wall ms of the calls, each timed alone, after one untimed call (warm caches)."""
    calls = list(calls)
    calls[0]()
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true k neighbours among the returned ids."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def search_all(store, queries: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([store.search(queries[i : i + batch], K)[1] for i in range(0, len(queries), batch)])


def tune(store, kind: str, queries: np.ndarray, truth: np.ndarray) -> tuple[dict, list[dict]]:
    """The first setting of SWEEPS[kind] that reaches GOAL_RECALL on `queries` (else the best),
    and the recall of each setting tried."""
    tried = []
    for setting in SWEEPS[kind]:
        store.tune(**setting)
        tried.append({**setting, "recall_at_8": round(recall(search_all(store, queries), truth), 4)})
        if tried[-1]["recall_at_8"] >= GOAL_RECALL:
            break
    best = next((t for t in tried if t["recall_at_8"] >= GOAL_RECALL), max(tried, key=lambda t: t["recall_at_8"]))
    setting = {k: v for k, v in best.items() if k != "recall_at_8"}
    store.tune(**setting)
    return setting, tried


def world_reasoner(quick: bool):
    """configs/world.yaml's reasoner shape (its retrieval settings left out: the step is
    timed without search), MiniLM's tokenizer, and the token ids its task head scores: every
    token of world 0's training answers, and eos (`--quick`: 2,000 questions, not 60,000)."""
    from omegaconf import OmegaConf

    from split_model.memory import HFMemory
    from split_model.reasoner import ReasonerConfig
    from split_model.tasks import KnowledgeWorld
    from split_model.training.data import output_token_ids
    from split_model.training.format import Formatter

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "world.yaml"))
    shape = {k: cfg["model"]["reasoner"][k] for k in ("d_model", "n_layers", "n_heads", "feedback", "embed_rank")}
    task = KnowledgeWorld(**{**cfg["data"]["task"]["init_args"], **({"n_train": 2000} if quick else {})})
    tok = HFMemory(**cfg["model"]["memory"]["init_args"]).tokenizer
    fmt = Formatter(tok, cfg["data"]["steps"], cfg["data"]["latent_steps"])
    ids = output_token_ids([fmt.encode(ex) for ex in task.examples("train")], tok.eos_id)
    return ReasonerConfig(**shape), tok, ids


def reasoner_step_ms(quick: bool) -> tuple[dict[str, float], dict]:
    """ms of one fixed-shape step of the world reasoner at batch 1 and 64 (see
    split_model.bench.speed), and that reasoner's description."""
    from split_model.bench.decode import time_steps_ms
    from split_model.bench.speed import reasoner_steps
    from split_model.reasoner import Reasoner

    cfg, tok, ids = world_reasoner(quick)
    torch.manual_seed(0)
    reasoner = Reasoner(cfg, vocab_size=tok.vocab_size, memory_dim=KEY_DIM).eval()
    reasoner.set_output_vocab(ids)
    reasoner.keep_rows([tok.bos_id, tok.pad_id])  # as fit does with output_vocab: task
    described = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "embed_rank": cfg.embed_rank,
                 "output_tokens": len(ids), "vocab_size": tok.vocab_size, "memory_tokens": MEMORY_TOKENS}
    out = {}
    with torch.no_grad():
        for b in (1, 64):
            memory = reasoner.encode_memory(torch.randn(b, MEMORY_TOKENS, 1, KEY_DIM),
                                            torch.ones(b, MEMORY_TOKENS, dtype=torch.bool))
            step = reasoner_steps(reasoner, memory, torch.device("cpu"))["fast"]
            (ms,) = time_steps_ms([step], rounds=3 if quick else 7, per_round=5)
            out[f"b{b}"] = round(ms, 4)
    return out, described


def key_geometry(store, n: int = 2000) -> dict:
    """Mean pairwise cosine of stored keys, and of each key with its nearest other key."""
    keys = store.keys(np.arange(min(n, store.num_chunks))).numpy()
    scores, _ = store.search(keys[:256], 2)
    return {"mean_cosine": round(float((keys @ keys.T).mean()), 3),
            "nearest_neighbour_cosine": round(float(scores[:, 1].mean()), 3)}


def run(args) -> dict:
    import faiss

    from split_model.memory import HFMemory
    from split_model.retrieval import RetrievalStore

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    n = 5_000 if args.quick else 200_000
    n_tune, n_eval = (64, 128) if args.quick else (256, 512)
    b1_repeats, b64_repeats = (20, 4) if args.quick else (100, 8)
    memory = HFMemory(config=BACKBONE, max_length=32)
    texts = sentences(n + n_tune + n_eval)
    with tempfile.TemporaryDirectory(prefix="retrieval-speed-") as tmp:
        tmp = Path(tmp)
        held_out = RetrievalStore.build(tmp / "queries", memory, texts[n:], chunk_tokens=CHUNK_TOKENS, desc="queries")
        queries = held_out.keys(np.arange(n_tune + n_eval)).numpy()
        tune_q, eval_q = queries[:n_tune], queries[n_tune:]
        stores, indexes, truth = {}, {}, {}
        for kind, spec in index_specs().items():
            log(f"building a {kind} store of {n:,} chunks")
            start = time.perf_counter()
            RetrievalStore.build(tmp / kind, memory, texts[:n], index=spec, chunk_tokens=CHUNK_TOKENS, desc=kind)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            store = stores[kind] = RetrievalStore.open(tmp / kind, memory)
            open_s = time.perf_counter() - start
            if kind == "flat":
                truth = {"tune": search_all(store, tune_q), "eval": search_all(store, eval_q)}
            setting, tried = tune(store, kind, tune_q, truth["tune"])
            log(f"{kind}: built in {build_s:.1f} s; timing searches at {setting or 'exact search'}")
            indexes[kind] = {
                "build_s": round(build_s, 2), "open_s": round(open_s, 3),
                "index_mb": round((tmp / kind / "index.faiss").stat().st_size / 2**20, 1),
                "query_ms_b1": round(median_ms(_searches(store, eval_q, 1, b1_repeats)), 4),
                "query_ms_b64": round(median_ms(_searches(store, eval_q, 64, b64_repeats)), 4),
                "recall_at_8": round(recall(search_all(store, eval_q), truth["eval"]), 4),
                "spec": asdict(store.spec), "settings_tried": tried,
            }
        geometry = key_geometry(stores["flat"])
        del stores, store, held_out  # unmap before the directory goes
    log("reasoner steps")
    step, reasoner = reasoner_step_ms(args.quick)
    share = {kind: {b: round(r[f"query_ms_{b}"] / (r[f"query_ms_{b}"] + step[b]), 4) for b in ("b1", "b64")}
             for kind, r in indexes.items()}
    met = {kind: {b: bool(share[kind][b] < GOAL_SHARE and indexes[kind]["recall_at_8"] >= GOAL_RECALL)
                  for b in ("b1", "b64")} for kind in indexes}
    return {"chunks": n, "key_dim": KEY_DIM, "k": K, "chunk_tokens": CHUNK_TOKENS, "indexes": indexes,
            "reasoner_step_ms": step, "search_share": share,
            "goal": f"search under {GOAL_SHARE:.0%} of a step at k={K} with recall@{K} >= {GOAL_RECALL}",
            "goal_met": met, "keys": geometry, "backbone": BACKBONE,
            "reasoner": reasoner,
            "queries": {"tune": n_tune, "eval": n_eval, "b1_repeats": b1_repeats, "b64_repeats": b64_repeats},
            "threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}}


def _searches(store, queries: np.ndarray, batch: int, n: int):
    """n calls, each searching the next `batch` queries (cycling through them)."""
    starts = [(i * batch) % (len(queries) - batch + 1) for i in range(n)]
    return [lambda s=s: store.search(queries[s : s + batch], K) for s in starts]
