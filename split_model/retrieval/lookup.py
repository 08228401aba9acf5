"""A retrieval store behind the reasoner's `Lookup` interface, for one batch.

The reasoner hands over queries (B, T, Dk); this searches the store on the host, reads the
fetched chunks' keys and memory states, and returns them on the reasoner's device. When the
batch's gold chunks are known (a task whose reasoning steps are documents of the corpus,
e.g. the knowledge worlds), it also
- measures recall: the share of gold steps whose chunk the search itself found;
- in training (`teacher`), puts a missing gold chunk in the last slot, so that later hops
  and the answer can be learned before the queries are good (evaluation never does);
- gives the auxiliary retrieval loss: the mean over gold steps of -log p(gold chunk), a
  softmax of query . key over the gold chunk, the fetched ones (the hardest negatives the
  store has) and `negatives` chunks drawn at random from the store (all of it when it is
  smaller). The fetched chunks alone teach slowly: a query far from its gold chunk only
  learns to leave its own neighbourhood; the random ones say where the gold chunk lies
  among all the others;
- gives the pick loss: where the gold chunk is among the fetched ones, -log of its share of
  the reasoner's preference over them (its log p, the attention bias) and, with a quote, of
  the quote's attention. The key's loss ranks the gold chunk among the whole store by
  query . key; the fetched chunks are its nearest rivals (the same relation about a person
  with a similar name), which that dot product tells apart least well, and which the quote
  must tell apart to carry the right name into the next query.
"""

from __future__ import annotations

import numpy as np
import torch

from split_model.reasoner.retrieval import Retrieved


class StoreLookup:
    def __init__(self, store, k: int, device: torch.device | str, *, gold: np.ndarray | None = None,
                 teacher: bool = False, exclude: np.ndarray | None = None, negatives: int = 1024, seed: int = 0):
        """store: a RetrievalStore; gold: (B, T) chunk id each step should fetch, -1 where none;
        exclude: (B, E) chunk ids never returned to row b (e.g. its own document), -1 padding;
        negatives: random chunks in the loss's softmax besides the gold and fetched ones,
        drawn once per lookup with `seed`."""
        self.store, self.k, self.device = store, k, torch.device(device)
        self.key_dim = store.key_dim
        self.gold, self.teacher, self.exclude = gold, teacher, exclude
        n = store.num_chunks
        self.random = np.arange(n) if negatives >= n else np.random.default_rng(seed).choice(n, negatives, replace=False)
        self.asked: dict[int, int] = {}  # step position -> gold steps searched there
        self.found: dict[int, int] = {}  # of those, how many the search itself found (before any teacher insert)
        self._terms: list[torch.Tensor] = []  # per observed call: sum of -log p(gold)
        self._scored = 0  # gold steps in the loss
        self._picks: list[torch.Tensor] = []  # per observed call: sum of -log share of the fetched gold chunk
        self._picked = 0  # terms in the pick loss
        self._pick_p: list[float] = []  # the gold chunk's share of the reasoner's preference, per term

    def __call__(self, queries: torch.Tensor, positions: torch.Tensor) -> Retrieved:
        b, t, dk = queries.shape
        flat = queries.reshape(b * t, dk).float().cpu().numpy()
        exclude = None if self.exclude is None else np.repeat(self.exclude, t, axis=0)  # (B*T, E)
        _, ids = self.store.search(flat, self.k, exclude)
        ids = ids.reshape(b, t, self.k)
        gold = self._gold_at(positions)
        if gold is not None:
            wanted = gold >= 0
            hit = (ids == gold[..., None]).any(-1)
            for j, p in enumerate(positions.tolist()):
                self.asked[p] = self.asked.get(p, 0) + int(wanted[:, j].sum())
                self.found[p] = self.found.get(p, 0) + int((hit & wanted)[:, j].sum())
            if self.teacher:
                ids[..., -1] = np.where(wanted & ~hit, gold, ids[..., -1])
        states, mask = self.store.values(ids)
        width = max(1, int(mask.sum(-1).max()))  # chunks are padded to the store's chunk_tokens: cut to the longest fetched
        states, mask = states[..., :width, :, :], mask[..., :width]
        keys = self.store.keys(ids)
        to = self.device
        return Retrieved(ids=torch.from_numpy(ids).to(to), keys=keys.to(to), states=states.to(to), mask=mask.to(to))

    def observe(self, positions: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor,
                queries: torch.Tensor) -> None:
        gold = self._gold_at(positions)
        if gold is None or not (gold >= 0).any():
            return
        wanted = torch.from_numpy(gold >= 0).to(queries.device)
        q, g = queries[wanted], gold[gold >= 0]  # (M, Dk), (M,)
        fetched = ids[wanted].flatten().cpu().numpy()
        candidates = np.unique(np.concatenate([g, fetched[fetched >= 0], self.random]))  # sorted
        keys = self.store.keys(candidates).to(queries.device, queries.dtype)  # (C, Dk)
        target = torch.from_numpy(np.searchsorted(candidates, g)).to(queries.device)
        self._terms.append(torch.nn.functional.cross_entropy(q @ keys.T, target, reduction="sum"))
        self._scored += len(g)
        self._pick(gold, ids, log_probs, kind="chunks")

    def observe_quote(self, positions: torch.Tensor, ids: torch.Tensor, shares: torch.Tensor) -> None:
        gold = self._gold_at(positions)
        if gold is not None:
            self._pick(gold, ids, shares.clamp_min(1e-9).log(), kind="quote")

    def _pick(self, gold: np.ndarray, ids: torch.Tensor, log_share: torch.Tensor, kind: str) -> None:
        """Adds -log share of the gold chunk, at every position that fetched it."""
        g = torch.from_numpy(gold).to(ids.device)
        hit = (ids == g[..., None]) & (g >= 0)[..., None]  # (B, T, k): at most one slot per position
        if not bool(hit.any()):
            return
        chosen = log_share[hit]
        self._picks.append(-chosen.sum())
        self._picked += chosen.numel()
        if kind == "chunks":
            self._pick_p.extend(chosen.detach().exp().tolist())

    def loss(self) -> torch.Tensor | None:
        """Mean -log p(gold chunk) over the gold steps seen; None without any."""
        if not self._scored:
            return None
        return torch.stack(self._terms).sum() / self._scored

    def pick_loss(self) -> torch.Tensor | None:
        """Mean -log share of the gold chunk where it was fetched (the chunks' log p and, with a
        quote, the quote's attention); None where no gold chunk was fetched."""
        if not self._picked:
            return None
        return torch.stack(self._picks).sum() / self._picked

    def pick_share(self) -> float | None:
        """Mean share p of the fetched gold chunk in the reasoner's preference over the fetched
        chunks (1/k: no preference); None where no gold chunk was fetched."""
        return sum(self._pick_p) / len(self._pick_p) if self._pick_p else None

    def recall(self) -> float | None:
        """Share of gold steps whose chunk the search found; None when no step had a gold chunk."""
        asked = sum(self.asked.values())
        return sum(self.found.values()) / asked if asked else None

    def recall_by_step(self) -> dict[int, float]:
        """The same, per step position (querying step h of a multi-hop question: hop h + 1)."""
        return {p: self.found[p] / n for p, n in sorted(self.asked.items()) if n}

    def _gold_at(self, positions: torch.Tensor) -> np.ndarray | None:
        """(B, T) gold ids at these step positions (-1 beyond the known ones), or None."""
        if self.gold is None:
            return None
        pos = positions.cpu().numpy()
        inside = pos < self.gold.shape[1]
        out = np.full((self.gold.shape[0], len(pos)), -1, dtype=np.int64)
        out[:, inside] = self.gold[:, pos[inside]]
        return out
