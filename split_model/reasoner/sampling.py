"""How the next token is chosen from the logits: greedy, or sampled with temperature,
top-k and top-p, reproducibly from a seed. Everything stays on the logits' device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Args:
        temperature: 0 chooses greedily (argmax); above 0 samples from softmax(logits / T).
        top_k: sample among the k most likely tokens only (0: no limit).
        top_p: sample among the smallest set of tokens whose probability reaches p (1: no limit).
        seed: seed of the sampling generator (None: a fresh random stream).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def chooser(self, device) -> "callable":
        """A function (B, V) logits -> (B,) chosen indices, with its own generator."""
        if self.greedy:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(2**62, ()).item()))
        return lambda logits: torch.multinomial(self.probs(logits), 1, generator=gen)[:, 0]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p."""
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            p = sorted_logits.softmax(-1)
            drop = p.cumsum(-1) - p >= self.top_p  # mass before this token already reaches p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits.softmax(-1)
