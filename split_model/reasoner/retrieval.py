"""Retrieval inside a reasoning step: the reasoner's query, and the fetched chunks' states
joined to its cross-attention.

At a querying step the output of block `retrieval_layer - 1` (index 0: the step's input)
is projected into the store's key space; a `Lookup` (which owns the store and faiss; the
reasoner imports neither) returns the k nearest chunks: their stored keys and their memory
states. Blocks `retrieval_layer` and above cross-attend to the question's memory and to
those chunks together. Search is not differentiable, so the query learns through attention:
every token of chunk j gets the additive attention bias log p_j, where
p = softmax over the k fetched chunks of (query . key_j). Attention that helps the loss
raises p_j, and the gradient of log p_j moves the query towards key_j and away from the
other fetched keys. `Lookup.observe` sees those log-probabilities and the queries, so a
caller that knows which chunk a step should have fetched can add a loss on them (see
split_model.retrieval.lookup).

With `retrieval_rerank`, p also counts each chunk's best-matching token: score_j =
query . key_j + max over the chunk's tokens of (rerank(query) . token state), the states of
every stored layer side by side. It ranks only the k chunks fetched, where a mean-pooled key
cannot tell two sentences about similar names apart. The probe reads the query without
sending gradient back into it: the query is trained by the keys (the attention bias and any
loss on the keys), the probe by the ranking. (With gradient through both, the query served two
masters, and on the knowledge worlds the answer was never learned.)

With `retrieval_match_question`, a query formed from the layer (the first, under `previous`)
also scores each fetched chunk by the question's tokens it contains: sum over the question's
tokens of their weight (an attention from the querying state) times their best cosine with any
of the chunk's tokens, times a learned scale that starts at zero. A probe vector matches one
token; the asked name is two or three, and this counts each of its pieces.
`retrieval_match_quote` does the same at a query the previous step proposed, with the
MATCH_TOKENS fetched tokens its quote weighed most (the name it read) in place of the
question's: the proposal carries them, packed after the query.

With `retrieval_query: previous`, step t+1's query is what step t proposes (`propose`): a
projection of its normed final hidden state and, with `retrieval_quote`, a quote of what it
fetched: attention from that state over the fetched tokens' memory states (every stored
layer side by side), mapped into the key space. Keys are the memory's own mean-pooled states,
so a quote can carry a name read in a chunk into the next query without compressing it to the
reasoner's width first; where the store's keys average the embeddings too (layers 0 and -1,
`key_layers: all`), the quote can copy the name's embedding exactly.

Which hop can depend on which: with `retrieval_layer` >= 1 the query reads the question
(block 0 cross-attends to it), and the chunks fetched at step t reach step t+1 only through
the feedback (the blocks below `retrieval_layer` never see them, and self-attention at
step t+1 reads those blocks' past inputs). So with feedback `none` a second hop cannot
depend on what the first found; with `last` or `all` it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e4  # score of an empty slot: finite, so a step with no chunk at all stays NaN-free
# The question match's scale is this times a parameter that starts at zero: Adam moves a parameter
# by about the learning rate per step, and a match that must outweigh the keys' ranking needs a
# scale of several units (with 1x, 1.5 after 1,000 steps of the knowledge world at lr 2e-3).
MATCH_GAIN = 10.0
MATCH_TOKENS = 4  # retrieval_match_quote: the quoted tokens of highest weight a proposal carries (a name's pieces)


@dataclass
class Retrieved:
    """What a lookup returns for T positions of B rows."""

    ids: torch.Tensor  # (B, T, k) chunk ids, -1 where no chunk
    keys: torch.Tensor  # (B, T, k, Dk) the chunks' stored keys (constants: search has no gradient)
    states: torch.Tensor  # (B, T, k, n, S, D_mem) the chunks' memory states
    mask: torch.Tensor  # (B, T, k, n) bool: real tokens


class Lookup(Protocol):
    """The reasoner's only view of a store."""

    key_dim: int

    def __call__(self, queries: torch.Tensor, positions: torch.Tensor) -> Retrieved:
        """queries (B, T, Dk), detached; positions (T,) step indices -> the chunks for each."""

    def observe(self, positions: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor,
                queries: torch.Tensor) -> None:
        """Called with the (B, T, k) log-probabilities the reasoner gave the fetched chunks and
        the queries (B, T, Dk) with their gradient (for a loss on the queries themselves)."""

    def observe_quote(self, positions: torch.Tensor, ids: torch.Tensor, shares: torch.Tensor) -> None:
        """Called (retrieval_quote) with the (B, T, k) share of each position's quote that fell
        on each fetched chunk, with its gradient (for a loss on what the quote reads)."""


@dataclass
class Fetched:
    """Fetched chunks as one block of extra cross-attention tokens (M = k * n per position)."""

    states: torch.Tensor  # (B, T, M, d) adapted chunk states
    bias: torch.Tensor  # (B, T, M) additive attention bias: log p of the token's chunk, -inf for padding
    raw: torch.Tensor | None  # (B, T, M, S*D_mem) the tokens' memory states, stored layers side by side (quoting only)
    real: torch.Tensor  # (B, T, M) bool: a fetched token, not padding
    ids: torch.Tensor  # (B, T, k) the fetched chunks' ids, -1 where none (or the position did not query)
    positions: torch.Tensor  # (T,) the step positions
    lookup: Lookup  # where they came from (told what the quote read)


class RetrievalHead(nn.Module):
    """Turns a reasoner state into a store query and fetched chunks into attention tokens."""

    def __init__(self, d_model: int, key_dim: int, every: int, from_previous: bool = False, quote_dim: int = 0,
                 rerank_dim: int = 0, question_dim: int = 0, match_dim: int = 0, match_quote: bool = False):
        """quote_dim: width of the fetched memory states a proposal quotes, S * D_mem for S stored
        layers (0: no quoting); rerank_dim: the same width, where the fetched chunks are also
        scored by their best-matching token (0: by their keys alone); question_dim: width of the
        question's memory states (S * D_mem for the S layers the memory reads) that a query
        formed from the layer quotes (0: none); match_dim: the same width, where a query formed
        from the layer also ranks the fetched chunks by the question's tokens they match (0: not);
        match_quote: a proposed query also ranks them by the tokens its quote weighed most (needs
        quote_dim)."""
        super().__init__()
        self.every = every
        self.key_dim = key_dim
        self.query = nn.Linear(d_model, key_dim, bias=False)  # reasoner width -> key space
        # retrieval_query previous: a second projection, of the previous step's final hidden state
        self.previous = nn.Linear(d_model, key_dim, bias=False) if from_previous else None
        # Marks fetched tokens apart from the question's (both carry token positions 0, 1, ...).
        self.kind = nn.Parameter(torch.zeros(d_model))
        self.quote_read = self.quote_write = None
        if quote_dim:  # retrieval_quote: created last, so the other weights match the unquoting head's
            self.quote_read = nn.Linear(d_model, quote_dim, bias=False)  # what to look for among the fetched tokens
            self.quote_write = nn.Linear(quote_dim, key_dim, bias=False)  # memory states -> key space
            nn.init.zeros_(self.quote_write.weight)  # starts as the query without quoting
        self.rerank = None
        if rerank_dim:  # retrieval_rerank: created last, for the same reason
            self.rerank = nn.Linear(key_dim, rerank_dim, bias=False)  # query -> a probe of the chunks' tokens
            nn.init.zeros_(self.rerank.weight)  # starts as the keys' ranking alone
        self.ask_read = self.ask_write = None
        if question_dim:  # retrieval_quote_question: created last, for the same reason
            self.ask_read = nn.Linear(d_model, question_dim, bias=False)  # what to look for in the question
            self.ask_write = nn.Linear(question_dim, key_dim, bias=False)  # memory states -> key space
            nn.init.zeros_(self.ask_write.weight)  # starts as the query without it
        self.match_read = self.match_scale = None
        if match_dim:  # retrieval_match_question: created last, for the same reason
            self.match_read = nn.Linear(d_model, match_dim, bias=False)  # which of the question's tokens to match
            self.match_scale = nn.Parameter(torch.zeros(()))  # x MATCH_GAIN; starts as the ranking without it
        self.quote_match_scale = None
        if match_quote:  # retrieval_match_quote: created last, for the same reason
            if not quote_dim:
                raise ValueError("match_quote matches the tokens a quote read: it needs quote_dim")
            self.quote_match_scale = nn.Parameter(torch.zeros(()))  # x MATCH_GAIN; starts at the ranking without it

    def forward(self, x: torch.Tensor, positions: torch.Tensor, lookup: Lookup, adapter: nn.Module,
                previous: torch.Tensor | None = None, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None) -> Fetched | None:
        """x (B, T, d) states of the querying layer at steps `positions` (T,); previous (B, T, Dk+):
        the proposal of each position's previous step (`propose`: the query, then with
        match_quote the quoted tokens), used at positions > 0
        where the head queries from the previous step; question (B, N, S*D_mem) and
        question_mask (B, N): the question's memory states, quoted by a query formed from the
        layer (retrieval_quote_question). None when no position queries (a step between
        queries)."""
        asking = positions % self.every == 0  # (T,)
        if x.shape[1] == 1 and not bool(asking[0]):  # one step, known on the host (positions are host-made)
            return None
        q = self.query(x)  # (B, T, Dk)
        if (self.ask_write is not None or self.match_read is not None) and question is None:
            raise ValueError("retrieval_quote_question and retrieval_match_question need the question's memory "
                             "states (encode_memory keeps them)")
        if self.ask_write is not None:
            states, real = per_position(question.to(x.dtype), question_mask, x.shape[1])
            q = q + self.ask_write(torch.einsum("btn,btnd->btd", quote_weights(self.ask_read(x), states, real), states))
        if self.previous is not None and previous is not None:
            q = torch.where((positions == 0)[None, :, None], q, previous[..., : self.key_dim])
        found = lookup(q.detach(), positions)
        b, t, k, n = found.mask.shape
        valid = (found.ids >= 0) & asking[None, :, None]  # (B, T, k)
        scores = torch.einsum("btd,btkd->btk", q, found.keys.to(q.dtype))
        if self.rerank is not None:  # + each chunk's best-matching token
            tokens = found.states.flatten(-2).to(q.dtype)  # (B, T, k, n, S*D)
            # The probe reads the query without training it: the query's gradient comes from the keys alone.
            match = torch.einsum("btd,btknd->btkn", self.rerank(q.detach()), tokens) * tokens.shape[-1] ** -0.5
            scores = scores + match.masked_fill(~found.mask, NEG).amax(-1)
        if self.match_read is not None:
            # Only where the query is formed from the layer: with `previous`, position 0 alone (positions
            # are host-made and ascending, so that is the first column or none).
            formed = t if self.previous is None else int(int(positions[0]) == 0)
            if formed:
                part = self._match_question(x[:, :formed], question, question_mask, found.states[:, :formed],
                                            found.mask[:, :formed])
                scores = scores + F.pad(MATCH_GAIN * self.match_scale * part, (0, 0, 0, t - formed))
        if self.quote_match_scale is not None and previous is not None:  # position 0's proposal is zeros: adds 0
            s, d = found.states.shape[-2:]
            packed = previous[..., self.key_dim :].unflatten(-1, (MATCH_TOKENS, s * d + 1))  # (B, T, P, S*D + 1)
            part = token_match(packed[..., -1], packed[..., :-1].unflatten(-1, (s, d)), found.states.to(q.dtype),
                               found.mask)
            scores = scores + MATCH_GAIN * self.quote_match_scale * part
        scores = scores.masked_fill(~valid, NEG)
        log_p = scores.log_softmax(-1)  # (B, T, k)
        ids = found.ids.masked_fill(~valid, -1)
        lookup.observe(positions, ids, log_p, q)
        states = adapter(found.states.flatten(0, 2), found.mask.flatten(0, 2))  # (B*T*k, n, S, D) -> (B*T*k, n, d)
        states = states.view(b, t, k * n, -1) + self.kind  # (B, T, k*n, d)
        real = (found.mask & valid[..., None]).flatten(2)  # (B, T, k*n)
        bias = log_p[..., None].expand(b, t, k, n).flatten(2).masked_fill(~real, float("-inf"))
        raw = None  # (B, T, k*n, S*D_mem) for quoting: every stored layer, as the keys may average them
        if self.quote_write is not None:
            raw = found.states.flatten(-2).flatten(2, 3).to(x.dtype)
        return Fetched(states=states, bias=bias, raw=raw, real=real, ids=ids, positions=positions, lookup=lookup)

    def _match_question(self, x: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
                        chunks: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) querying states; question (B, N, S*D) and question_mask (B, N); chunks
        (B, T, k, n, S, D) the fetched chunks' memory states, chunk_mask (B, T, k, n). (B, T, k):
        per chunk, the sum over the question's tokens of their attention weight (from x) times
        their best cosine similarity with any of the chunk's tokens (per layer, averaged over S)."""
        b, t, k, n, s, d = chunks.shape
        if question.shape[-1] != s * d:
            raise ValueError(f"retrieval_match_question compares the question's memory states ({question.shape[-1]} "
                             f"wide) with the store's ({s} layers of {d}): the memory must read the layers the "
                             "store holds")
        states, real = per_position(question.to(x.dtype), question_mask, t)
        weights = quote_weights(self.match_read(x), states, real)  # (B, T, N)
        return token_match(weights, states.unflatten(-1, (s, d)), chunks.to(x.dtype), chunk_mask)

    def propose(self, hidden: torch.Tensor, fetched: Fetched | None) -> torch.Tensor:
        """The query each position proposes for the step after it: hidden (B, T, d), its normed
        final hidden state; fetched: what it fetched (None: nothing, a step between queries).
        (B, T, Dk): the `previous` projection, plus with quoting the attention-weighted fetched
        memory states mapped into the key space (zero where a position fetched nothing)."""
        proposal = self.previous(hidden)
        if self.quote_write is None or fetched is None:
            if self.quote_match_scale is None:
                return proposal
            return F.pad(proposal, (0, MATCH_TOKENS * (self.quote_write.in_features + 1)))  # no tokens: weight 0
        raw = fetched.raw  # (B, T, M, S*D_mem)
        weights = quote_weights(self.quote_read(hidden), raw, fetched.real, bias=fetched.bias)  # likelier chunks first
        b, t, k = fetched.ids.shape
        fetched.lookup.observe_quote(fetched.positions, fetched.ids, weights.view(b, t, k, -1).sum(-1))
        proposal = proposal + self.quote_write(torch.einsum("btm,btmd->btd", weights, raw))
        if self.quote_match_scale is None:
            return proposal
        # retrieval_match_quote: the MATCH_TOKENS tokens the quote weighed most, with their weights, packed
        # after the query (fewer fetched tokens than that: the rest weigh 0).
        top = weights.topk(min(MATCH_TOKENS, weights.shape[-1]), dim=-1)  # (B, T, P')
        tokens = raw.gather(2, top.indices[..., None].expand(-1, -1, -1, raw.shape[-1]))  # (B, T, P', S*D)
        carried = F.pad(torch.cat([tokens, top.values[..., None]], -1), (0, 0, 0, MATCH_TOKENS - top.indices.shape[-1]))
        return torch.cat([proposal, carried.flatten(-2)], -1)  # (B, T, Dk + P * (S*D + 1))


def per_position(question: torch.Tensor, mask: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's states (B, N, W) and mask (B, N) as seen from each of t positions: (B, t, N, W)
    and (B, t, N), views without a copy."""
    return question[:, None].expand(-1, t, -1, -1), mask[:, None, :].expand(-1, t, -1)


def token_match(weights: torch.Tensor, asked: torch.Tensor, chunks: torch.Tensor,
                chunk_mask: torch.Tensor) -> torch.Tensor:
    """weights (B, T, I) of the asked tokens asked (B, T, I, S, D); chunks (B, T, k, n, S, D) the
    fetched chunks' memory states, chunk_mask (B, T, k, n). (B, T, k): per chunk, the sum over
    the asked tokens of their weight times their best cosine similarity (per layer, averaged
    over the S layers) with any of the chunk's real tokens (-1 where it has none)."""
    asked = F.normalize(asked.to(chunks.dtype), dim=-1)
    tokens = F.normalize(chunks, dim=-1)
    similar = torch.einsum("btisd,btkjsd->btkij", asked, tokens) / chunks.shape[-2]  # (B, T, k, I, n)
    best = similar.masked_fill(~chunk_mask[:, :, :, None, :], -1.0).amax(-1)  # (B, T, k, I)
    return torch.einsum("bti,btki->btk", weights.to(best.dtype), best)


def quote_weights(probe: torch.Tensor, states: torch.Tensor, real: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """A quote's attention: probe (B, T, D) over states (B, T, M, D) where real (B, T, M), plus
    an additive bias (B, T, M) on the real ones. (B, T, M) weights, all zero at a position with
    no real state."""
    scores = torch.einsum("btd,btmd->btm", probe, states) * states.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.masked_fill(~real, 0.0)
    return scores.masked_fill(~real, NEG).softmax(-1) * real.any(-1, keepdim=True)
