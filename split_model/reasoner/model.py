"""The recurrent reasoner: one small transformer stack applied one step at a time.

At step t the input is a token embedding (or a learned latent vector for a "continuous
thought" step that takes no token) plus the feedback of step t-1's layer states. Every
block self-attends to the reasoner's past steps through a KV cache and cross-attends to
the memory, whose keys/values are computed once per context.

Two executions of one set of weights:
- fixed-shape (static.py): preallocated KV caches written in place, position tables, no
  host syncs. `forward` (training) and `generate`/`decoder` use it; on CUDA its steps can
  be captured as graphs.
- dynamic (this file): `step(state, tokens, latent)` carries a growing `ReasonerState`, and
  `forward_dynamic` is the plain recurrence built on it. It is the reference the
  fixed-shape path is tested against, and `execution: dynamic` in a config.
With feedback, training is the exact recurrence (backprop through time, truncated every
`bptt_steps`); without feedback it is one parallel pass, which computes the same thing.
`run()` is the dynamic core: T new positions, given caches and given feedback inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from split_model.reasoner.config import ReasonerConfig
from split_model.reasoner.layers import (
    AbsolutePosition,
    Block,
    FactorisedEmbedding,
    Feedback,
    LayerCache,
    MemoryEncoder,
    MemoryKV,
    MemoryWindow,
    RMSNorm,
)
from split_model.reasoner.retrieval import RetrievalHead
from split_model.reasoner.sampling import Sampling
from split_model.reasoner.static import PositionTables, StaticDecoder, static_forward


HALT_INIT_BIAS = -3.0  # a fresh halting head says "continue" (p = 0.047)


@dataclass
class ReasonerState:
    """Everything step t+1 needs from the steps before it."""

    memory: MemoryKV  # cross-attention keys/values of the context
    caches: list[LayerCache] | None  # per block, self-attention K/V of past steps
    layer_states: torch.Tensor | None  # (L+1, B, 1, d): every layer's output at the last step
    proposal: torch.Tensor | None = None  # (B, 1, Dk+) the query the last step proposed (query: previous), + match tokens

    @property
    def position(self) -> int:
        return 0 if self.caches is None else self.caches[0].length

    def detach(self) -> "ReasonerState":
        """Cut the gradient path into the past (truncated backprop through time)."""
        caches = None if self.caches is None else [c.detach() for c in self.caches]
        layer_states = None if self.layer_states is None else self.layer_states.detach()
        proposal = None if self.proposal is None else self.proposal.detach()
        return replace(self, caches=caches, layer_states=layer_states, proposal=proposal)


class MemoryAdapter(nn.Module):
    """(B, N, S, D_mem) states of S backbone layers -> (B, N, d) reasoner-width memory.

    Token positions are added explicitly: rotary backbones keep them only implicitly. The
    optional window and encoder layers (memory_window, memory_layers) are set by the Reasoner.
    """

    def __init__(self, memory_dim: int, num_states: int, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(memory_dim, elementwise_affine=False)  # backbone layers differ in scale
        self.proj = nn.Linear(num_states * memory_dim, d_model, bias=False)
        self.position = AbsolutePosition(d_model)
        self.window: MemoryWindow | None = None
        self.encoder: MemoryEncoder | None = None

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, N): real tokens, for the window and encoder layers (None: every token is real)."""
        pos = torch.arange(states.shape[1], device=states.device)
        x = self.norm(states).flatten(2)  # (B, N, S*D)
        mem = self.proj(x) + self.position(pos)  # (B, N, d)
        if self.window is not None:
            mem = mem + self.window(x, mask)
        return mem if self.encoder is None else self.encoder(mem, mask)


class Reasoner(nn.Module):
    def __init__(
        self,
        cfg: ReasonerConfig,
        *,
        vocab_size: int,
        memory_dim: int,
        num_states: int = 1,
        embed_init: torch.Tensor | None = None,
        key_dim: int | None = None,
    ):
        """key_dim: width of the retrieval store's keys; required when cfg.retrieval_k > 0."""
        super().__init__()
        if cfg.retrieval_k and not key_dim:
            raise ValueError("a reasoner with retrieval_k > 0 needs the store's key_dim (open the store first)")
        self.cfg = cfg
        self.embed = FactorisedEmbedding(vocab_size, cfg, embed_init)
        self.latent_input = nn.Parameter(torch.randn(cfg.d_model) / cfg.d_model**0.5)  # input of a no-token step
        self.adapter = MemoryAdapter(memory_dim, num_states, cfg.d_model)
        self.position = AbsolutePosition(cfg.d_model)  # which step this is
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        # Created last so that, for one seed, every other weight equals the `none` model's.
        self.feedback = Feedback(cfg) if cfg.feedback != "none" else None
        if self.feedback is not None and cfg.feedback_tokens:
            self.feedback.expected_input = self.expected_input
        self.halt = None
        if cfg.halting:  # created after every other weight, for the same reason
            self.halt = nn.Linear(cfg.d_model, 1)
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, HALT_INIT_BIAS)  # "continue": sigmoid(-3) = 0.047
        self.retrieval = None
        if cfg.retrieval_k:  # created last, for the same reason
            self.retrieval = RetrievalHead(cfg.d_model, key_dim, cfg.retrieval_every, cfg.retrieval_query == "previous",
                                           quote_dim=num_states * memory_dim if cfg.retrieval_quote else 0,
                                           rerank_dim=num_states * memory_dim if cfg.retrieval_rerank else 0,
                                           question_dim=num_states * memory_dim if cfg.retrieval_quote_question else 0,
                                           match_dim=num_states * memory_dim if cfg.retrieval_match_question else 0,
                                           match_quote=cfg.retrieval_match_quote)
        if cfg.memory_window:  # created last, for the same reason
            self.adapter.window = MemoryWindow(num_states * memory_dim, cfg.d_model, cfg.memory_window)
        if cfg.memory_layers:  # created last, for the same reason
            self.adapter.encoder = MemoryEncoder(cfg)
        self.last_latent_steps: torch.Tensor | None = None  # latent steps each row took in the last generate
        # Token ids the head scores (None: the whole vocabulary); see set_output_vocab.
        self.register_buffer("output_ids", None, persistent=False)
        self._tables: PositionTables | None = None
        self.input_grad_hook: Callable[[torch.Tensor], None] | None = None  # see probe_inputs

    def position_tables(self, n: int, device) -> PositionTables:
        """Rotary and step-position tables for at least n steps, built once per size class."""
        t = self._tables
        if t is None or t.length < n or t.cos.device != torch.device(device):
            size = max(64, 1 << (n - 1).bit_length())  # powers of two: few rebuilds
            t = self._tables = PositionTables(size, self.cfg.head_dim, self.cfg.d_model, self.cfg.rope_base, device)
        return t

    def set_output_vocab(self, ids: torch.Tensor | None) -> None:
        """Score only these token ids (sorted, unique), or every id with None.

        A backbone vocabulary of 30-50k tokens makes the output head most of a small
        reasoner's cost, while a task's targets use a few dozen of them.
        """
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).unique(sorted=True)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.embed.vocab_size:
                raise ValueError(f"output vocabulary must be non-empty ids in 0..{self.embed.vocab_size - 1}")
            ids = ids.to(self.embed.table.device)
            kept = self.embed.kept_ids()
            missing = [] if kept is None else ids[~torch.isin(ids, kept)].tolist()
            if missing:
                raise ValueError(f"output vocabulary: token ids {missing[:8]} have no row in the reasoner's embedding "
                                 f"(it keeps {len(kept)} ids); keep them first (embed.keep)")
        elif self.embed.rows is not None:
            raise ValueError("the reasoner's embedding keeps only some ids' rows: it cannot score the whole vocabulary")
        self.output_ids = ids

    def keep_rows(self, extra_ids=()) -> None:
        """Drop the embedding rows of every id outside the output vocabulary and `extra_ids`
        (the special tokens the reasoner reads, e.g. bos): see FactorisedEmbedding.keep.
        Training and generation compute what they computed before; the reasoner has fewer
        parameters and its backward pass no dense (V, r) table gradient."""
        if self.output_ids is None:
            raise ValueError("keep_rows needs an output vocabulary (set_output_vocab) first")
        extra = torch.as_tensor(list(extra_ids), dtype=torch.long, device=self.output_ids.device)
        self.embed.keep(torch.cat([self.output_ids, extra]))

    def probe_inputs(self, x: torch.Tensor) -> None:
        """Hand the gradient of the steps' inputs x (B, T, d) to `input_grad_hook` when one is
        set: at position t it carries every loss term downstream of step t, through the
        recurrence, so its size by t shows gradients growing or vanishing with depth."""
        if self.input_grad_hook is not None and x.requires_grad:
            x.register_hook(self.input_grad_hook)

    # -- memory ---------------------------------------------------------------------------
    def encode_memory(self, states: torch.Tensor, mask: torch.Tensor) -> MemoryKV:
        """states (B, N, S, D_mem), mask (B, N) -> per-block cross-attention K/V."""
        mem = self.adapter(states, mask)
        # Contiguous once here, or every step's attention copies the permuted K/V again.
        kv = [tuple(x.contiguous() for x in blk.xattn.memory_kv(mem)) for blk in self.blocks]
        mem = MemoryKV(kv=kv, mask=mask.bool()[:, None, None, :])
        if self.cfg.retrieval_quote_question or self.cfg.retrieval_match_question:  # for the query to quote, match
            mem.states, mem.states_mask = states.flatten(-2), mask.bool()
        return mem

    # -- the shared core --------------------------------------------------------------------
    def run(
        self,
        tokens: torch.Tensor,
        latent: torch.Tensor,
        memory: MemoryKV,
        caches: list[LayerCache] | None = None,
        feedback_in: torch.Tensor | None = None,
        previous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[LayerCache], torch.Tensor | None]:
        """T new positions. tokens, latent: (B, T); feedback_in: (B, T, d) or None; previous:
        (B, T, Dk) the retrieval query each position's previous step proposed (retrieval_query:
        previous), or None.

        Returns the normed final hidden (B, T, d), every layer's output (L+1, B, T, d)
        (index 0 is the input), the extended caches, and the retrieval query each position
        proposes for the step after it (B, T, Dk) where queries come from the previous step,
        else None.
        """
        start = 0 if caches is None else caches[0].length
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = torch.where(latent[..., None], self.latent_input, self.embed(tokens)) + self.position(pos)  # (B, T, d)
        self.probe_inputs(x)
        if feedback_in is not None:
            x = x + feedback_in
        layer_states, new_caches, fetched = [x], [], None
        for i, blk in enumerate(self.blocks):
            if i == self.cfg.retrieval_layer and self.retrieval is not None and memory.lookup is not None:
                fetched = self.retrieval(x, pos, memory.lookup, self.adapter, previous,  # joins this block and those above
                                         question=memory.states, question_mask=memory.states_mask)
            x, cache = blk(x, None if caches is None else caches[i], memory.kv[i], memory.mask, fetched)
            layer_states.append(x)
            new_caches.append(cache)
        hidden = self.norm(x)
        proposal = self.retrieval.propose(hidden, fetched) if self._queries_previous(memory) else None
        return hidden, torch.stack(layer_states), new_caches, proposal

    def head_rows(self) -> torch.Tensor:
        """(V, r) embedding rows the head scores, or (K, r) when an output vocabulary is set."""
        if self.output_ids is None:
            return self.embed.head_rows()
        return self.embed.table[self.embed.index(self.output_ids)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V), or (..., K) over output_ids when an output vocabulary is set."""
        return (hidden @ self.embed.up) @ self.head_rows().T

    def expected_input(self, last: torch.Tensor) -> torch.Tensor:
        """(..., d) output of the last block -> (..., d) the input embedding that its output
        distribution expects, sum_i p_i E_i over the output vocabulary (feedback_tokens)."""
        rows = self.head_rows()  # gathered once for the logits and the mixture
        probs = ((self.norm(last) @ self.embed.up) @ rows.T).softmax(-1)
        return (probs @ rows) @ self.embed.up.T

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in the logits -> token ids."""
        return index if self.output_ids is None else self.output_ids[index]

    # -- one step (generation) ---------------------------------------------------------------
    def start(self, memory: MemoryKV) -> ReasonerState:
        return ReasonerState(memory=memory, caches=None, layer_states=None)

    def step(self, state: ReasonerState, tokens: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, ReasonerState]:
        """tokens, latent: (B,) -> logits (B, V) and the next state."""
        hidden, state = self._advance(state, tokens, latent)
        return self.logits(hidden), state

    def _advance(self, state: ReasonerState, tokens: torch.Tensor, latent: torch.Tensor):
        """tokens, latent: (B,) -> the normed final hidden (B, d) of this step and the next state."""
        hidden, state = self._step_hidden(state, tokens[:, None], latent[:, None])
        return hidden[:, 0], state

    def _step_hidden(self, state: ReasonerState, tokens, latent) -> tuple[torch.Tensor, ReasonerState]:
        """tokens, latent (B, 1) -> the step's normed final hidden (B, 1, d) and the next state."""
        fb = None
        if self.feedback is not None and state.layer_states is not None:
            fb = self.feedback(state.layer_states)  # (B, 1, d)
        hidden, layer_states, caches, proposal = self.run(tokens, latent, state.memory, state.caches, fb,
                                                          state.proposal)
        return hidden, ReasonerState(memory=state.memory, caches=caches, layer_states=layer_states, proposal=proposal)

    def _queries_previous(self, memory: MemoryKV) -> bool:
        """Whether retrieval queries come from the previous step (a recurrence even without feedback)."""
        return memory.lookup is not None and self.cfg.retrieval_query == "previous"

    # -- a whole sequence (training) -----------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV, bptt_steps: int | None = None,
        return_hidden: bool = False,
    ):
        """tokens, latent: (B, T) -> logits (B, T, V), exact for every feedback mode (fixed shapes);
        with return_hidden, (logits, the normed final hidden (B, T, d))."""
        if memory.lookup is not None:  # a search per step is a host round trip: the step-by-step path
            return self.forward_dynamic(tokens, latent, memory, bptt_steps, return_hidden)
        if self.feedback is None:  # no recurrence besides attention: one parallel pass is exact
            hidden, *_ = self.run(tokens, latent, memory)
            return self._out(hidden, return_hidden)
        if self.output_ids is None:
            hidden = static_forward(self, self.embed(tokens), latent, memory, bptt_steps)
            return self._out(hidden, return_hidden)
        # One gather for the input and output rows: each gather of the (V, r) table costs a
        # dense (V, r) gradient in backward, the largest tensor a small reasoner touches.
        rows = self.embed.table[self.embed.index(torch.cat([tokens.flatten(), self.output_ids]))]  # (B*T + K, r)
        inputs, head = rows[: tokens.numel()].view(*tokens.shape, -1), rows[tokens.numel() :]
        hidden = static_forward(self, inputs @ self.embed.up.T, latent, memory, bptt_steps)
        logits = (hidden @ self.embed.up) @ head.T  # (B, T, K)
        return (logits, hidden) if return_hidden else logits

    def _out(self, hidden: torch.Tensor, return_hidden: bool):
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def halt_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) normed final hidden -> (...) probability of stopping the latent steps here."""
        return torch.sigmoid(self.halt(hidden).squeeze(-1))

    def forward_off(self, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV, return_hidden: bool = False):
        """Feedback switched off: one parallel teacher-forced pass over all positions, whatever
        `feedback` is configured (its parameters get no gradient). While the feedback gate is
        closed (as it starts) this is exactly `forward`."""
        hidden, *_ = self.run(tokens, latent, memory)
        return self._out(hidden, return_hidden)

    def forward_jacobi(
        self, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV, passes: int,
        bptt_steps: int | None = None, return_hidden: bool = False,
    ):
        """The recurrence solved by fixed-point (Jacobi) iteration: `passes` parallel passes over
        all positions, where pass k feeds position t the layer states of position t-1 from
        pass k-1 (pass 0 feeds nothing: it is `forward_off`). After k passes positions 0..k-1
        are exact, so passes >= T computes exactly what `forward` computes, gradients included
        (backprop runs through every pass). With `bptt_steps`, the feedback into positions
        t = bptt_steps, 2*bptt_steps, ... is detached, as the sequential path detaches there;
        self-attention inside a pass still carries gradients across those boundaries (the
        sequential path detaches its KV cache too)."""
        if passes < 1:
            raise ValueError(f"jacobi needs at least one pass, got {passes}")
        hidden, layer_states, _, proposal = self.run(tokens, latent, memory)
        previous = self._queries_previous(memory)
        if self.feedback is None and not previous:  # nothing is fed back: one pass is exact
            return self._out(hidden, return_hidden)
        t = tokens.shape[1]
        cut = None
        if bptt_steps and t > bptt_steps:  # cut[t-1] is True where position t reads detached states
            cut = (torch.arange(1, t + 1, device=tokens.device) % bptt_steps == 0)[:, None]

        def read(x: torch.Tensor) -> torch.Tensor:
            """(..., T, D) of the last pass -> (..., T-1, D): what positions 1..T-1 read, cut where BPTT cuts."""
            x = x[..., :-1, :]
            return x if cut is None else torch.where(cut[: t - 1], x.detach(), x)

        for _ in range(passes - 1):
            prev = read(layer_states)  # (L+1, B, T-1, d)
            fed = None if self.feedback is None else F.pad(self.feedback(prev), (0, 0, 1, 0))  # position 0 reads nothing
            # Position t queries with what position t-1 proposed; position 0 queries from its own layer.
            last = F.pad(read(proposal), (0, 0, 1, 0)) if previous else None  # (B, T, Dk)
            hidden, layer_states, _, proposal = self.run(tokens, latent, memory, None, fed, last)
        return self._out(hidden, return_hidden)

    def forward_dynamic(
        self, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV, bptt_steps: int | None = None,
        return_hidden: bool = False,
    ):
        """What `forward` computes, one `step` at a time with a growing cache (the reference)."""
        if self.feedback is None and not self._queries_previous(memory):
            hidden, *_ = self.run(tokens, latent, memory)
            return self._out(hidden, return_hidden)
        state, hiddens = self.start(memory), []
        for t in range(tokens.shape[1]):
            if bptt_steps and t and t % bptt_steps == 0:
                state = state.detach()
            hidden, state = self._step_hidden(state, tokens[:, t : t + 1], latent[:, t : t + 1])
            hiddens.append(hidden)
        return self._out(torch.cat(hiddens, dim=1), return_hidden)

    # -- generation ---------------------------------------------------------------------------
    def decoder(self, memory: MemoryKV, max_steps: int,
                kind: Literal["compiled", "graphs", "static", "dynamic"] = "static"):
        """An object whose `step(tokens, latent)` -> logits runs one step of generation.

        static: fixed shapes, buffers for max_steps steps; graphs: the same captured as a CUDA
        graph (CUDA only; falls back to static with a warning); compiled: the step compiled by
        torch.compile, then captured (CUDA only; falls back to graphs); dynamic: the reference `step`.
        """
        if kind == "dynamic" or memory.lookup is not None:  # retrieval: searches between steps
            return DynamicDecoder(self, memory)
        decoder = StaticDecoder(self, memory, max_steps)
        if kind in ("graphs", "compiled") and memory.mask.is_cuda:
            from split_model.reasoner.graphs import graphed_or_eager

            return graphed_or_eager(decoder, compile=kind == "compiled")
        return decoder

    @torch.no_grad()
    def generate(
        self, memory: MemoryKV, n_latent: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int, *,
        sampling: Sampling | None = None, decoder: Literal["compiled", "graphs", "static", "dynamic"] = "static",
        on_token: Callable[[torch.Tensor, torch.Tensor], None] | None = None, check_every: int = 16,
    ) -> list[list[int]]:
        """Row b takes n_latent[b] latent steps, then bos, then writes until eos.

        Rows with different latent counts run in one batch: each step says per row whether
        it is latent. Ids stay on the device: the host reads whether every row is done only
        every `check_every` steps, and the ids once at the end. on_token(ids (B,), writing (B,)
        bool) sees each step's ids as they come (streaming; that costs a read per step).
        Returns each row's generated ids (eos excluded). Greedy unless `sampling` says otherwise.
        With a halting head, n_latent is each row's maximum: a row stops thinking after the first
        latent step whose halt probability passes the threshold; `last_latent_steps` (B,) holds
        the latent steps each row took.
        """
        b, device = n_latent.shape[0], n_latent.device
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        most, least = (int(x) for x in torch.stack([n_latent.max(), n_latent.min()]).tolist())  # one host read
        if least < 0:
            raise ValueError(f"latent step counts must be >= 0, got {least}")
        steps = most + max_new_tokens
        dec = self.decoder(memory, steps, decoder)
        n_latent = n_latent.clone()  # halting shortens it in place
        choose = (sampling or Sampling()).chooser(device)
        record = torch.full((b, steps), eos_id, dtype=torch.long, device=device)  # (B, T) every step's id
        prev = torch.full((b,), bos_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for t in range(steps):
            tokens = torch.where(t <= n_latent, bos_id, prev)  # latent steps ignore it; step n_latent reads bos
            thinking = t < n_latent
            prev = self.token_ids(choose(dec.step(tokens, thinking)))
            if self.halt is not None:  # stop thinking after this step where the head says so
                halt = thinking & (self.halt_probability(dec.hidden) > self.cfg.halt_threshold)
                n_latent = torch.where(halt, t + 1, n_latent)
            record[:, t] = prev
            writing = (t >= n_latent) & ~done
            if on_token is not None:
                on_token(prev, writing & (prev != eos_id))
            done |= writing & ((prev == eos_id) | (t - n_latent + 1 >= max_new_tokens))
            if (t + 1) % check_every == 0 and bool(done.all()):
                break
        self.last_latent_steps = n_latent
        return _answers(record.cpu(), n_latent.cpu(), eos_id, max_new_tokens)


def _answers(record: torch.Tensor, n_latent: torch.Tensor, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Each row's written ids: from its first answer step, up to eos (excluded) or the budget."""
    out = []
    for row, k in zip(record.tolist(), n_latent.tolist()):
        ids = row[k : k + max_new_tokens]
        out.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return out


class DynamicDecoder:
    """The reference `Reasoner.step` (growing cache) behind the decoder interface."""

    def __init__(self, reasoner: Reasoner, memory: MemoryKV):
        self.reasoner, self.state = reasoner, reasoner.start(memory)

    def step(self, tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        self.hidden, self.state = self.reasoner._advance(self.state, tokens, latent)  # as StaticDecoder keeps it
        return self.reasoner.logits(self.hidden)
