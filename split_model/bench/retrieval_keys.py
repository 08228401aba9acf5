"""`split-model bench retrieval-keys`: how well can a query that states what it asks for find
its fact, by how the store keys its chunks?

For every hop of the unseen world's valid questions (world 1, as `retrieval-hops` scores) the
bench writes the query a reasoner that knows whom and what to ask would mean: the hop's fact
without its answer ("The friend of Selin is", "Selin lives in"). The memory of
configs/world.yaml reads it as a store reads a chunk, and it is searched by cosine among every
fact of that world, once per way of keying: the mean token state of the last layer
(`key_layers: last`), of the embeddings (layer 0) alone, and the average of both normalised
means (`key_layers: all`, what the world's store holds). The result is the recall@k of each key
for relation facts and city facts: a ceiling on what a learned query reaches with that key
if it says the name the way the memory reads it. The store is the one `retrieval-hops` builds
(built here when missing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from split_model.bench import log

TOPS = (1, 4, 16)  # recall@k reported
ROWS = 2048  # chunks per read of the store's values


def stated_query(fact: str) -> tuple[str, str]:
    """("The friend of Selin is", "relation") for "The friend of Selin is Perga.", ("Selin lives
    in", "city") for "Selin lives in Rome.": the fact with its answer taken away."""
    from split_model.tasks.world import parse_fact

    parsed = parse_fact(fact)
    if parsed is None:
        raise ValueError(f"not a fact of a knowledge world: {fact!r}")
    relation, subject, _ = parsed
    if relation == "lives in":
        return f"{subject} lives in", "city"
    return f"The {relation} of {subject} is", "relation"


def layer_means(store, layers: list[int]) -> dict[int, torch.Tensor]:
    """Per stored layer index in `layers`: every chunk's mean token state (N, D), L2-normalised."""
    out = {i: torch.empty(store.num_chunks, store.hidden_size) for i in layers}
    for start in range(0, store.num_chunks, ROWS):
        ids = np.arange(start, min(start + ROWS, store.num_chunks))
        mean = _token_mean(*store.values(ids))  # (R, S, D)
        for i in layers:
            out[i][ids] = F.normalize(mean[:, i], dim=-1)
    return out


def recall(queries: torch.Tensor, keys: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Share of queries whose gold chunk is among the k most similar keys, for each k in TOPS."""
    top = torch.cat([(q @ keys.T).topk(max(TOPS), -1).indices for q in queries.split(256)])
    return {str(k): round(float((top[:, :k] == gold[:, None]).any(1).float().mean()), 4) for k in TOPS}


def run(args) -> dict:
    import faiss

    from split_model.bench.retrieval_hops import RUNS, UNSEEN_WORLD, build_store, config_memory, config_task
    from split_model.retrieval import RetrievalStore
    from split_model.tasks import KnowledgeWorld

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    n_entities = 60 if args.quick else int(config_task()["n_entities"])
    memory = config_memory()
    if memory.num_states != 2 or list(memory.layers)[0] != 0:
        raise ValueError(f"configs/world.yaml reads the memory's layers {list(memory.layers)}: this bench compares "
                         "the embeddings (layer 0) with the last layer, so it needs layers [0, -1]")
    world = KnowledgeWorld(world=UNSEEN_WORLD, n_entities=n_entities, n_train=200,
                           **({"n_valid": 40, "n_test": 40} if args.quick else {"n_valid": 400, "n_test": 400}))
    store = RetrievalStore.open(build_store(UNSEEN_WORLD, n_entities, memory, RUNS / ("quick" if args.quick else "full")),
                                memory)
    texts, kinds, gold = [], [], []
    for example in world.examples("valid"):
        for fact in example.steps:
            query, kind = stated_query(fact)
            chunk = store.find(fact)
            if chunk is None:
                raise ValueError(f"the store {store.path} lacks the fact {fact!r}: delete it and run again")
            texts.append(query)
            kinds.append(kind)
            gold.append(chunk)
    log(f"{len(texts)} stated queries against {store.num_chunks:,} chunks of {store.path}")
    with torch.no_grad():
        read = torch.cat([_mean_states(memory, texts[i : i + 256]) for i in range(0, len(texts), 256)])  # (Q, 2, D)
    means = layer_means(store, [0, 1])
    both = store.keys(np.arange(store.num_chunks))  # as stored: the normalised average of both layers' means
    queries = {"last": F.normalize(read[:, 1], dim=-1), "embeddings": F.normalize(read[:, 0], dim=-1)}
    queries["all"] = F.normalize(F.normalize(read, dim=-1).mean(1), dim=-1)
    keys = {"last": means[1], "embeddings": means[0], "all": both}
    gold_t, kinds_a = torch.tensor(gold), np.array(kinds)
    out: dict = {"keys": {}}
    for name in ("last", "embeddings", "all"):
        out["keys"][name] = {kind: recall(queries[name][torch.from_numpy(kinds_a == kind)], keys[name],
                                          gold_t[torch.from_numpy(kinds_a == kind)])
                             for kind in ("relation", "city")}
        log(f"keyed by {name}: {out['keys'][name]}")
    return {**out, "queries": {kind: int((kinds_a == kind).sum()) for kind in ("relation", "city")},
            "chunks": store.num_chunks, "world": UNSEEN_WORLD, "n_entities": n_entities, "store": str(store.path),
            "memory_layers": list(memory.layers), "recall_at": list(TOPS)}


def _mean_states(memory, texts: list[str]) -> torch.Tensor:
    """(B, S, D): each text's mean token state per layer, read as the store reads a chunk."""
    read = memory.encode_texts(texts)
    return _token_mean(read.states, read.mask)


def _token_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """states (B, N, S, D), mask (B, N) -> (B, S, D): each layer's mean over the real tokens."""
    real = mask[:, :, None, None].float()
    return (states.float() * real).sum(1) / real.sum(1)
