"""A retrieval store behind the reasoner's `Lookup` interface, for one batch.

The reasoner hands over queries (B, T, Dk); this searches the store on the host, reads the
fetched chunks' keys and memory states, and returns them on the reasoner's device. When the
batch's gold chunks are known (a task whose reasoning steps are documents of the corpus,
e.g. the knowledge worlds), it also
- measures recall: the share of gold steps whose chunk the search itself found;
- in training (`teacher`), puts a missing gold chunk in the last slot, so that later hops
  and the answer can be learned before the queries are good (evaluation never does);
- turns the log-probabilities the reasoner gave the fetched chunks into the auxiliary
  retrieval loss: the mean of -log p(gold chunk) over gold steps (a softmax over the
  fetched chunks, whose wrong ones are the hardest negatives the store has).
"""

from __future__ import annotations

import numpy as np
import torch

from split_model.reasoner.retrieval import Retrieved


class StoreLookup:
    def __init__(self, store, k: int, device: torch.device | str, *, gold: np.ndarray | None = None,
                 teacher: bool = False, exclude: np.ndarray | None = None):
        """store: a RetrievalStore; gold: (B, T) chunk id each step should fetch, -1 where none;
        exclude: (B, E) chunk ids never returned to row b (e.g. its own document), -1 padding."""
        self.store, self.k, self.device = store, k, torch.device(device)
        self.key_dim = store.key_dim
        self.gold, self.teacher, self.exclude = gold, teacher, exclude
        self.asked = 0  # gold steps searched
        self.found = 0  # of those, how many the search itself found (before any teacher insert)
        self._terms: list[torch.Tensor] = []  # per observed call: sum of -log p(gold)
        self._scored = 0  # gold steps with the gold chunk among the fetched

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
            self.asked += int(wanted.sum())
            self.found += int((hit & wanted).sum())
            if self.teacher:
                ids[..., -1] = np.where(wanted & ~hit, gold, ids[..., -1])
        states, mask = self.store.values(ids)
        width = max(1, int(mask.sum(-1).max()))  # chunks are padded to the store's chunk_tokens: cut to the longest fetched
        states, mask = states[..., :width, :, :], mask[..., :width]
        keys = self.store.keys(ids)
        to = self.device
        return Retrieved(ids=torch.from_numpy(ids).to(to), keys=keys.to(to), states=states.to(to), mask=mask.to(to))

    def observe(self, positions: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor) -> None:
        gold = self._gold_at(positions)
        if gold is None:
            return
        gold = torch.from_numpy(gold).to(ids.device)[..., None]  # (B, T, 1)
        hit = (ids == gold) & (gold >= 0)  # (B, T, k): at most one slot per step
        self._terms.append(-(log_probs * hit).sum())
        self._scored += int(hit.sum())

    def loss(self) -> torch.Tensor | None:
        """Mean -log p(gold chunk) over the steps that had it among the fetched; None without any."""
        if not self._scored:
            return None
        return torch.stack(self._terms).sum() / self._scored

    def recall(self) -> float | None:
        """Share of gold steps whose chunk the search found; None when no step had a gold chunk."""
        return self.found / self.asked if self.asked else None

    def _gold_at(self, positions: torch.Tensor) -> np.ndarray | None:
        """(B, T) gold ids at these step positions (-1 beyond the known ones), or None."""
        if self.gold is None:
            return None
        pos = positions.cpu().numpy()
        inside = pos < self.gold.shape[1]
        out = np.full((self.gold.shape[0], len(pos)), -1, dtype=np.int64)
        out[:, inside] = self.gold[:, pos[inside]]
        return out
