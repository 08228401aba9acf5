"""The recurrent reasoner: one small transformer stack applied one step at a time.

At step t the input is a token embedding (or a learned latent vector for a "continuous
thought" step that takes no token) plus the feedback of step t-1's layer states. Every
block self-attends to the reasoner's past steps through a KV cache and cross-attends to
the memory, whose keys/values are computed once per context.

Two ways in, one set of weights:
- `step(state, tokens, latent)`: one step for generation, carrying a `ReasonerState`.
- `forward(tokens, latent, memory)`: training over a whole sequence. With feedback it is
  the exact recurrence (backprop through time, truncated every `bptt_steps`); without
  feedback it is one parallel pass, which computes the same thing.
`run()` is the shared core: T new positions, given caches and given feedback inputs. A
parallel Jacobi mode or a static-cache step can be built on it without touching the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from split_model.reasoner.config import ReasonerConfig
from split_model.reasoner.layers import (
    AbsolutePosition,
    Block,
    FactorisedEmbedding,
    Feedback,
    LayerCache,
    MemoryKV,
    RMSNorm,
)


@dataclass
class ReasonerState:
    """Everything step t+1 needs from the steps before it."""

    memory: MemoryKV  # cross-attention keys/values of the context
    caches: list[LayerCache] | None  # per block, self-attention K/V of past steps
    states: torch.Tensor | None  # (L+1, B, 1, d): every layer's output at the last step

    @property
    def position(self) -> int:
        return 0 if self.caches is None else self.caches[0].length

    def detach(self) -> "ReasonerState":
        """Cut the gradient path into the past (truncated backprop through time)."""
        caches = None if self.caches is None else [c.detach() for c in self.caches]
        states = None if self.states is None else self.states.detach()
        return replace(self, caches=caches, states=states)


class MemoryAdapter(nn.Module):
    """(B, N, S, D_mem) states of S backbone layers -> (B, N, d) reasoner-width memory.

    Token positions are added explicitly: rotary backbones keep them only implicitly.
    """

    def __init__(self, memory_dim: int, num_states: int, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(memory_dim, elementwise_affine=False)  # backbone layers differ in scale
        self.proj = nn.Linear(num_states * memory_dim, d_model, bias=False)
        self.position = AbsolutePosition(d_model)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(states.shape[1], device=states.device)
        return self.proj(self.norm(states).flatten(2)) + self.position(pos)  # (B, N, S*D) -> (B, N, d)


class Reasoner(nn.Module):
    def __init__(
        self,
        cfg: ReasonerConfig,
        *,
        vocab_size: int,
        memory_dim: int,
        num_states: int = 1,
        embed_init: torch.Tensor | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.embed = FactorisedEmbedding(vocab_size, cfg, embed_init)
        self.latent = nn.Parameter(torch.randn(cfg.d_model) / cfg.d_model**0.5)  # input of a no-token step
        self.adapter = MemoryAdapter(memory_dim, num_states, cfg.d_model)
        self.position = AbsolutePosition(cfg.d_model)  # which step this is
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        # Created last so that, for one seed, every other weight equals the `none` model's.
        self.feedback = Feedback(cfg) if cfg.feedback != "none" else None
        # Token ids the head scores (None: the whole vocabulary); see set_output_vocab.
        self.register_buffer("output_ids", None, persistent=False)

    def set_output_vocab(self, ids: torch.Tensor | None) -> None:
        """Score only these token ids (sorted, unique), or every id with None.

        A backbone vocabulary of 30-50k tokens makes the output head most of a small
        reasoner's cost, while a task's targets use a few dozen of them.
        """
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).unique(sorted=True)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.embed.table.shape[0]:
                raise ValueError(f"output vocabulary must be non-empty ids in 0..{self.embed.table.shape[0] - 1}")
            ids = ids.to(self.embed.table.device)
        self.output_ids = ids

    # -- memory ---------------------------------------------------------------------------
    def encode_memory(self, states: torch.Tensor, mask: torch.Tensor) -> MemoryKV:
        """states (B, N, S, D_mem), mask (B, N) -> per-block cross-attention K/V."""
        mem = self.adapter(states)
        kv = [blk.xattn.memory_kv(mem) for blk in self.blocks]
        return MemoryKV(kv=kv, mask=mask.bool()[:, None, None, :])

    # -- the shared core --------------------------------------------------------------------
    def run(
        self,
        tokens: torch.Tensor,
        latent: torch.Tensor,
        memory: MemoryKV,
        caches: list[LayerCache] | None = None,
        feedback_in: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[LayerCache]]:
        """T new positions. tokens, latent: (B, T); feedback_in: (B, T, d) or None.

        Returns the normed final hidden (B, T, d), every layer's output (L+1, B, T, d)
        (index 0 is the input) and the extended caches.
        """
        start = 0 if caches is None else caches[0].length
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = torch.where(latent[..., None], self.latent, self.embed(tokens)) + self.position(pos)  # (B, T, d)
        if feedback_in is not None:
            x = x + feedback_in
        states, new_caches = [x], []
        for i, blk in enumerate(self.blocks):
            x, cache = blk(x, None if caches is None else caches[i], memory.kv[i], memory.mask)
            states.append(x)
            new_caches.append(cache)
        return self.norm(x), torch.stack(states), new_caches

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V), or (..., K) over output_ids when an output vocabulary is set."""
        if self.output_ids is None:
            return self.embed.logits(hidden)
        return (hidden @ self.embed.up) @ self.embed.table[self.output_ids].T

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in the logits -> token ids."""
        return index if self.output_ids is None else self.output_ids[index]

    # -- one step (generation) ---------------------------------------------------------------
    def start(self, memory: MemoryKV) -> ReasonerState:
        return ReasonerState(memory=memory, caches=None, states=None)

    def step(self, state: ReasonerState, tokens: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, ReasonerState]:
        """tokens, latent: (B,) -> logits (B, V) and the next state."""
        hidden, states, caches = self._step_hidden(state, tokens[:, None], latent[:, None])
        return self.logits(hidden[:, 0]), ReasonerState(memory=state.memory, caches=caches, states=states)

    def _step_hidden(self, state: ReasonerState, tokens, latent):
        fb = None
        if self.feedback is not None and state.states is not None:
            fb = self.feedback(state.states)  # (B, 1, d)
        return self.run(tokens, latent, state.memory, state.caches, fb)

    # -- a whole sequence (training) -----------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV, bptt_steps: int | None = None
    ) -> torch.Tensor:
        """tokens, latent: (B, T) -> logits (B, T, V), exact for every feedback mode."""
        if self.feedback is None:  # no recurrence besides attention: one parallel pass is exact
            hidden, _, _ = self.run(tokens, latent, memory)
            return self.logits(hidden)
        state, hiddens = self.start(memory), []
        for t in range(tokens.shape[1]):
            if bptt_steps and t and t % bptt_steps == 0:
                state = state.detach()
            hidden, states, caches = self._step_hidden(state, tokens[:, t : t + 1], latent[:, t : t + 1])
            state = ReasonerState(memory=memory, caches=caches, states=states)
            hiddens.append(hidden)
        return self.logits(torch.cat(hiddens, dim=1))

    # -- greedy decoding ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, memory: MemoryKV, n_latent: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int
    ) -> list[list[int]]:
        """Row b takes n_latent[b] latent steps, then bos, then greedy tokens until eos.

        Rows with different latent counts run in one batch: each step says per row whether
        it is latent. Returns each row's generated ids (eos excluded).
        """
        b = n_latent.shape[0]
        device = n_latent.device
        state, prev = self.start(memory), torch.full((b,), bos_id, dtype=torch.long, device=device)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for t in range(int(n_latent.max()) + max_new_tokens):
            latent = t < n_latent
            tokens = torch.where(t <= n_latent, torch.full_like(prev, bos_id), prev)
            logits, state = self.step(state, tokens, latent)
            nxt = self.token_ids(logits.argmax(-1))
            writing = (t >= n_latent) & ~done
            for i in torch.nonzero(writing & (nxt != eos_id)).flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= writing & ((nxt == eos_id) | (t - n_latent + 1 >= max_new_tokens))
            prev = nxt
            if bool(done.all()):
                break
        return out
