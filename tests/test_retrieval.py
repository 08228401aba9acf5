"""Retrieval inside the reasoner: the query, the fetched chunks in cross-attention, and the
Lookup interface (here a brute-force lookup over random chunks; the faiss store has its own tests)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from split_model.reasoner import Reasoner, ReasonerConfig
from split_model.reasoner.retrieval import MATCH_GAIN, MATCH_TOKENS, Retrieved, quote_weights

C, N_TOK, S, D, DK, V = 40, 6, 2, 16, 12, 30  # two stored layers: the quote reads both


class BruteLookup:
    """The k chunks of highest cosine, recorded call by call."""

    def __init__(self, k: int = 3, seed: int = 0, empty: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.keys = F.normalize(torch.randn(C, DK, generator=g), dim=-1)
        self.states = torch.randn(C, N_TOK, S, D, generator=g)
        self.mask = torch.arange(N_TOK) < torch.randint(2, N_TOK + 1, (C, 1), generator=g)  # (C, n) ragged chunks
        self.k, self.key_dim, self.empty = k, DK, empty
        self.positions: list[list[int]] = []
        self.observed: list[torch.Tensor] = []
        self.quoted: list[torch.Tensor] = []

    def __call__(self, queries, positions):
        self.positions.append(positions.tolist())
        ids = (F.normalize(queries, dim=-1) @ self.keys.T).topk(self.k, -1).indices  # (B, T, k)
        if self.empty:
            ids = torch.full_like(ids, -1)
        safe = ids.clamp_min(0)
        mask = self.mask[safe] & (ids >= 0)[..., None]
        return Retrieved(ids=ids, keys=self.keys[safe], states=self.states[safe], mask=mask)

    def observe(self, positions, ids, log_probs, queries):
        self.observed.append(log_probs)

    def observe_quote(self, positions, ids, shares):
        self.quoted.append(shares)


def model(feedback: str = "all", every: int = 1, layer: int = 1, seed: int = 0, query: str = "layer",
          quote: bool = False, memory_layers: int = 0, memory_window: int = 0, question: bool = False) -> Reasoner:
    torch.manual_seed(seed)
    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, feedback=feedback, retrieval_k=3,
                         retrieval_every=every, retrieval_layer=layer, retrieval_query=query, retrieval_quote=quote,
                         memory_layers=memory_layers, memory_window=memory_window, retrieval_quote_question=question)
    r = Reasoner(cfg, vocab_size=V, memory_dim=D, num_states=S, key_dim=DK)
    with torch.no_grad():
        for part in (r.adapter.encoder, r.adapter.window):  # mixing, so the window and encoder matter
            for p in [] if part is None else part.parameters():
                p.normal_(0, 0.3)
        if r.feedback is not None:
            r.feedback.gate.weight.normal_(0, 0.2)  # open, so the feedback path matters
        if quote:
            r.retrieval.quote_write.weight.normal_(0, 0.5)  # quoting, so the quote path matters
        if question:
            r.retrieval.ask_write.weight.normal_(0, 0.5)  # quoting the question, so that path matters
    return r


def twin(r: Reasoner, **changes) -> Reasoner:
    """A reasoner of r's config with `changes`, built with seed 0 and given r's weights; the
    weights only it has (created last) keep their initialisation."""
    torch.manual_seed(0)
    out = Reasoner(dataclasses.replace(r.cfg, **changes), vocab_size=V, memory_dim=D, num_states=S, key_dim=DK)
    out.load_state_dict(r.state_dict(), strict=False)
    return out


def same_outputs(new: Reasoner, plain: Reasoner) -> tuple[torch.Tensor, torch.Tensor]:
    """Asserts both give the same logits on `inputs()`; returns new's (with its graph) and plain's."""
    tokens, latent, states, mask = inputs()
    out = new(tokens, latent, memory(new, states, mask, BruteLookup()))
    with torch.no_grad():
        ref = plain(tokens, latent, memory(plain, states, mask, BruteLookup()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    return out, ref


def inputs(b: int = 3, t: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, t), generator=g)
    latent = torch.zeros(b, t, dtype=torch.bool)
    latent[:, :3] = True
    states = torch.randn(b, 5, S, D, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return tokens, latent, states, mask


def memory(r: Reasoner, states, mask, lookup):
    mem = r.encode_memory(states, mask)
    mem.lookup = lookup
    return mem


def layer_cosines(asked: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """(I, S, D) and (n, S, D) -> (I, n): cosine of each pair of tokens per layer, averaged over layers."""
    return torch.stack([F.cosine_similarity(asked[:, None, s], chunk[None, :, s], dim=-1) for s in range(S)]).mean(0)


def stepwise(r: Reasoner, tokens, latent, mem) -> torch.Tensor:
    state, out = r.start(mem), []
    for t in range(tokens.shape[1]):
        logits, state = r.step(state, tokens[:, t], latent[:, t])
        out.append(logits)
    return torch.stack(out, 1)


def test_gradient_reaches_the_query_projection():
    r = model()
    tokens, latent, states, mask = inputs()
    r(tokens, latent, memory(r, states, mask, BruteLookup())).square().mean().backward()
    grad = r.retrieval.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert r.retrieval.kind.grad.abs().sum() > 0


@pytest.mark.parametrize("query", ["layer", "previous", "quote", "encoded", "question"])
@pytest.mark.parametrize("feedback", ["none", "all"])
def test_training_forward_equals_generation_steps(feedback, query):
    """Without feedback and with queries from the step's own layer, the forward is one parallel
    pass (one search for every position); every variant must compute what the recurrent
    steps compute, one search per step. Jacobi passes (as many as steps) compute it too.
    encoded: queries from the layer, question and chunks through a memory window and encoder layer.
    question: queries from the layer that quote the question."""
    r = model(feedback, query="previous" if query == "quote" else "layer" if query in ("encoded", "question") else query,
              quote=query == "quote", memory_layers=int(query == "encoded"), memory_window=2 * (query == "encoded"),
              question=query == "question")
    tokens, latent, states, mask = inputs()
    parallel = BruteLookup()
    out = r(tokens, latent, memory(r, states, mask, parallel))
    with torch.no_grad():
        ref = stepwise(r, tokens, latent, memory(r, states, mask, BruteLookup()))
        jacobi = r.forward_jacobi(tokens, latent, memory(r, states, mask, BruteLookup()), passes=tokens.shape[1])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(jacobi, ref, rtol=1e-4, atol=1e-5)
    parallel_pass = feedback == "none" and query in ("layer", "encoded", "question")
    assert len(parallel.positions) == (1 if parallel_pass else tokens.shape[1])


def test_queries_from_the_previous_step_read_its_final_state():
    """retrieval_query previous: step t's query is a projection of step t-1's normed final hidden."""

    class Spy(BruteLookup):
        def __call__(self, queries, positions):
            self.queries = queries
            return super().__call__(queries, positions)

    r = model("none", query="previous")
    tokens, latent, states, mask = inputs()
    spy = Spy()
    with torch.no_grad():
        state = r.start(memory(r, states, mask, spy))
        for t in range(3):
            _, new = r.step(state, tokens[:, t], latent[:, t])
            if t:
                torch.testing.assert_close(spy.queries, r.retrieval.previous(r.norm(state.layer_states[-1])))
            state = new


def test_a_quote_carries_what_a_step_fetched_into_the_next_query():
    """retrieval_quote: step t+1's query is the previous projection of step t's final hidden
    plus quote_write of the fetched tokens' memory states (all S stored layers), weighted by attention. With the
    attention's read weights at zero every real token of chunk j scores log p_j, as in the
    cross-attention, so the quote can be computed by hand from what the lookup returned."""

    class Spy(BruteLookup):
        def __call__(self, queries, positions):
            self.queries, self.found = queries, super().__call__(queries, positions)
            return self.found

    r = model("none", query="previous", quote=True)
    with torch.no_grad():
        r.retrieval.quote_read.weight.zero_()
    tokens, latent, states, mask = inputs()
    spy = Spy()
    with torch.no_grad():
        state = r.start(memory(r, states, mask, spy))
        _, state = r.step(state, tokens[:, 0], latent[:, 0])
        found, log_p = spy.found, spy.observed[-1]  # step 0's chunks (B, 1, k, ...) and their log p (B, 1, k)
        real = found.mask[:, 0]  # (B, k, n)
        weights = log_p[:, 0, :, None].exp() * real  # p_j on each real token of chunk j
        weights = weights / weights.sum((1, 2), keepdim=True)
        quoted = torch.einsum("bkn,bknd->bd", weights, found.states[:, 0].flatten(-2))  # every stored layer, side by side
        hidden = r.norm(state.layer_states[-1][:, 0])
        expected = r.retrieval.previous(hidden) + r.retrieval.quote_write(quoted)
        r.step(state, tokens[:, 1], latent[:, 1])
    torch.testing.assert_close(spy.queries[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_the_quotes_share_of_each_fetched_chunk_is_observed_and_learns():
    """observe_quote gets, per querying position, the quote's attention summed over each fetched
    chunk's tokens: shares of 1 in all where a position fetched something. A loss on one chunk's
    share reaches the quote's read projection and, trained, raises that share."""
    r = model("all", query="previous", quote=True)
    tokens, latent, states, mask = inputs()
    lookup = BruteLookup()
    r(tokens, latent, memory(r, states, mask, lookup))
    shares = torch.cat(lookup.quoted, 1)  # (B, T, k): one call per step on the step-by-step path
    assert shares.shape == (3, 6, 3)
    torch.testing.assert_close(shares.sum(-1), torch.ones(3, 6))
    assert (shares >= 0).all()

    class Fixed(BruteLookup):  # the same chunks whatever the query: a fixed target
        def __call__(self, queries, positions):
            return super().__call__(self.keys[:1].expand_as(queries) * 5, positions)

    lookup = Fixed()
    opt = torch.optim.Adam(r.retrieval.quote_read.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        lookup.quoted.clear()
        r(tokens, latent, memory(r, states, mask, lookup))
        share = torch.cat(lookup.quoted, 1)[..., 0]  # every position's first fetched chunk
        loss = -share.clamp_min(1e-9).log().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] / 2, losses


def test_quoting_starts_as_the_query_without_quoting_and_learns():
    """The quote's write projection starts at zero: outputs equal the unquoting model's with the
    same seed (its weights are created last), and the loss reaches the quote's projection."""
    plain = model("all", query="previous")
    quoting = twin(plain, retrieval_quote=True)
    assert not quoting.retrieval.quote_write.weight.any()
    out, _ = same_outputs(quoting, plain)
    out.square().mean().backward()
    assert quoting.retrieval.quote_write.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="retrieval_quote"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2, retrieval_quote=True)


def test_the_first_query_can_quote_the_question():
    """retrieval_quote_question: a query formed from the layer adds quote_write-like projection of
    an attention over the question's memory states (all S layers side by side). Its write
    projection starts at zero (outputs equal the model's without it), the loss reaches it, and
    with it open step 0's query is that sum, computed here by hand; later steps' queries under
    `previous` are the proposals, unchanged."""
    plain = model("all", query="previous", quote=True)
    asking = twin(plain, retrieval_quote_question=True)
    assert not asking.retrieval.ask_write.weight.any() and asking.retrieval.ask_read.weight.shape == (S * D, 32)
    out, _ = same_outputs(asking, plain)
    out.square().mean().backward()
    assert asking.retrieval.ask_write.weight.grad.abs().sum() > 0

    class Spy(BruteLookup):
        def __call__(self, queries, positions):
            self.seen.append(queries)
            return super().__call__(queries, positions)

    with torch.no_grad():
        asking.retrieval.ask_write.weight.normal_(0, 0.5)
        tokens, latent, states, mask = inputs()
        spy = Spy()
        spy.seen = []
        mem = memory(asking, states, mask, spy)
        state = asking.start(mem)
        _, state = asking.step(state, tokens[:, 0], latent[:, 0])
        x = state.layer_states[asking.cfg.retrieval_layer][:, 0]  # step 0's querying layer (B, d)
        flat = states.flatten(-2)  # (B, N, S*D)
        scores = torch.einsum("bd,bnd->bn", asking.retrieval.ask_read(x), flat) / (S * D) ** 0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = asking.retrieval.query(x) + asking.retrieval.ask_write(torch.einsum("bn,bnd->bd", weights, flat))
    torch.testing.assert_close(spy.seen[0][:, 0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="retrieval_quote_question"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_quote_question=True)


def test_reranking_starts_as_the_keys_ranking_and_learns():
    """retrieval_rerank's projection starts at zero: outputs equal the model's without it (its
    weights are created last); the loss reaches it, and the reasoner's parallel pass and its
    step-by-step path agree with it open."""
    plain = model("all", query="previous", quote=True)
    ranking = twin(plain, retrieval_rerank=True)
    assert not ranking.retrieval.rerank.weight.any() and ranking.retrieval.rerank.weight.shape == (S * D, DK)
    out, ref = same_outputs(ranking, plain)
    out.square().mean().backward()
    tokens, latent, states, mask = inputs()
    assert ranking.retrieval.rerank.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ranking.retrieval.rerank.weight.normal_(0, 0.5)
        full = ranking(tokens, latent, memory(ranking, states, mask, BruteLookup()))
        steps = stepwise(ranking, tokens, latent, memory(ranking, states, mask, BruteLookup()))
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert (full - ref).abs().max() > 1e-3  # the open projection changes what the chunks weigh
    with pytest.raises(ValueError, match="retrieval_rerank ranks the fetched chunks: it needs retrieval_k > 0"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_rerank=True)


def test_a_chunk_is_reranked_by_its_best_matching_token():
    """log p of the fetched chunks = log_softmax over j of query . key_j + max over chunk j's
    real tokens of (rerank(query) . state) / sqrt(S * D), computed here by hand."""
    r = twin(model("none"), retrieval_rerank=True)
    with torch.no_grad():
        r.retrieval.rerank.weight.normal_(0, 0.5)
    x = torch.randn(2, 1, 32)
    lookup = BruteLookup()
    with torch.no_grad():
        r.retrieval(x, torch.tensor([0]), lookup, r.adapter)
        q = r.retrieval.query(x)
        ids = (F.normalize(q, dim=-1) @ lookup.keys.T).topk(3, -1).indices  # (2, 1, 3)
        tokens = lookup.states[ids].flatten(-2)  # (2, 1, 3, n, S*D)
        match = torch.einsum("btd,btknd->btkn", r.retrieval.rerank(q), tokens) / (S * D) ** 0.5
        best = match.masked_fill(~lookup.mask[ids], float("-inf")).amax(-1)
        expected = (torch.einsum("btd,btkd->btk", q, lookup.keys[ids]) + best).log_softmax(-1)
    torch.testing.assert_close(lookup.observed[-1], expected, rtol=1e-5, atol=1e-5)
    # The probe reads the query without training it: the query projection's gradient is the
    # one it gets with the best match held constant; the probe's own weight does learn.
    r.zero_grad()
    r.retrieval(x, torch.tensor([0]), lookup, r.adapter)
    lookup.observed[-1][..., 0].sum().backward()
    q = r.retrieval.query(x)
    by_hand = (torch.einsum("btd,btkd->btk", q, lookup.keys[ids]) + best).log_softmax(-1)[..., 0].sum()
    (want,) = torch.autograd.grad(by_hand, r.retrieval.query.weight)
    torch.testing.assert_close(r.retrieval.query.weight.grad, want, rtol=1e-5, atol=1e-6)
    assert r.retrieval.rerank.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("query", ["previous", "layer"])
def test_matching_the_question_starts_as_the_keys_ranking_and_learns(query):
    """retrieval_match_question's scale starts at zero: outputs equal the model's without it (its
    weights are created last); the loss reaches the scale and, once it is open, the attention
    that weighs the question's tokens; the parallel pass and the step-by-step path agree."""
    plain = model("all", query=query, quote=query == "previous")
    matching = twin(plain, retrieval_match_question=True)
    assert float(matching.retrieval.match_scale) == 0.0 and matching.retrieval.match_read.weight.shape == (S * D, 32)
    out, ref = same_outputs(matching, plain)
    out.square().mean().backward()
    assert matching.retrieval.match_scale.grad.abs() > 0
    tokens, latent, states, mask = inputs()
    with torch.no_grad():
        matching.retrieval.match_scale.fill_(3.0)
    matching.zero_grad()
    full = matching(tokens, latent, memory(matching, states, mask, BruteLookup()))
    full.square().mean().backward()
    assert matching.retrieval.match_read.weight.grad.abs().sum() > 0
    with torch.no_grad():
        steps = stepwise(matching, tokens, latent, memory(matching, states, mask, BruteLookup()))
    torch.testing.assert_close(steps, full.detach(), rtol=1e-4, atol=1e-4)
    assert (full - ref).abs().max() > 1e-3  # the open scale changes what the chunks weigh
    with pytest.raises(ValueError, match="retrieval_match_question ranks the fetched chunks"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_match_question=True)


def test_a_chunk_is_ranked_by_the_question_tokens_it_matches():
    """log p of the fetched chunks = log_softmax over j of query . key_j + scale x sum over the
    question's real tokens i of w_i x max over chunk j's real tokens of the cosine of their
    states (per layer, averaged), w the attention of match_read(x) over the question's states,
    scale = MATCH_GAIN x match_scale;
    computed here by hand. Under `previous`, a step after the first (its query a proposal)
    is ranked by its keys alone."""
    r = twin(model("none", query="previous"), retrieval_match_question=True)
    with torch.no_grad():
        r.retrieval.match_scale.fill_(2.5)
    _, _, states, mask = inputs()
    b = states.shape[0]
    x = torch.randn(b, 1, 32)
    question = states.flatten(-2)
    lookup = BruteLookup()
    with torch.no_grad():
        r.retrieval(x, torch.tensor([0]), lookup, r.adapter, question=question, question_mask=mask)
        q = r.retrieval.query(x)
        ids = (F.normalize(q, dim=-1) @ lookup.keys.T).topk(3, -1).indices[:, 0]  # (B, k)
        expected = torch.empty(b, 3)
        for row in range(b):
            scores = torch.einsum("d,nd->n", r.retrieval.match_read(x[row, 0]), question[row]) / (S * D) ** 0.5
            w = scores.masked_fill(~mask[row], float("-inf")).softmax(-1)  # (N,)
            for j, c in enumerate(ids[row].tolist()):
                chunk = lookup.states[c][lookup.mask[c]]  # (n_real, S, D)
                cos = layer_cosines(states[row], chunk)  # (N, n_real)
                expected[row, j] = q[row, 0] @ lookup.keys[c] + 2.5 * MATCH_GAIN * (w * cos.amax(-1)).sum()
    torch.testing.assert_close(lookup.observed[-1][:, 0], expected.log_softmax(-1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a later step under `previous`: the proposal's keys alone
        previous = torch.randn(b, 1, DK)
        r.retrieval(x, torch.tensor([1]), lookup, r.adapter, previous=previous, question=question, question_mask=mask)
        ids = (F.normalize(previous, dim=-1) @ lookup.keys.T).topk(3, -1).indices
        keys_alone = torch.einsum("btd,btkd->btk", previous, lookup.keys[ids]).log_softmax(-1)
    torch.testing.assert_close(lookup.observed[-1], keys_alone, rtol=1e-5, atol=1e-5)


def test_matching_the_quote_starts_as_the_keys_ranking_and_learns():
    """retrieval_match_quote's scale starts at zero: outputs equal the model's without it; the
    loss reaches the scale; with it open, the parallel pass (which packs the quoted tokens into
    each proposal) and the step-by-step path agree, outputs and gradients."""
    plain = model("all", query="previous", quote=True)
    matching = twin(plain, retrieval_match_quote=True)
    assert float(matching.retrieval.quote_match_scale) == 0.0
    out, ref = same_outputs(matching, plain)
    out.square().mean().backward()
    assert matching.retrieval.quote_match_scale.grad.abs() > 0
    with torch.no_grad():
        matching.retrieval.quote_match_scale.fill_(3.0)
    tokens, latent, states, mask = inputs()
    grads = []
    for run in (lambda m: matching(tokens, latent, m), lambda m: stepwise(matching, tokens, latent, m)):
        matching.zero_grad()
        result = run(memory(matching, states, mask, BruteLookup()))
        result.square().mean().backward()
        grads.append((result.detach(), matching.retrieval.quote_read.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-5)
    assert (grads[0][0] - ref).abs().max() > 1e-3  # the open scale changes what the chunks weigh
    with pytest.raises(ValueError, match="retrieval_match_quote matches the tokens a quote read"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2, retrieval_query="previous",
                       retrieval_match_quote=True)


def test_a_proposed_query_ranks_chunks_by_the_tokens_its_quote_read_most():
    """A proposal carries the query, then the MATCH_TOKENS fetched tokens of highest quote
    weight with those weights; the next step's log p = query . key_j + scale x sum over them of
    weight x best cosine (per layer, averaged) with chunk j's real tokens; by hand."""
    r = twin(model("none", query="previous", quote=True), retrieval_match_quote=True)
    with torch.no_grad():
        r.retrieval.quote_match_scale.fill_(0.7)
    b, lookup = 3, BruteLookup()
    x, hidden = torch.randn(b, 1, 32), torch.randn(b, 1, 32)
    with torch.no_grad():
        fetched = r.retrieval(x, torch.tensor([0]), lookup, r.adapter)
        packed = r.retrieval.propose(hidden, fetched)
        weights = quote_weights(r.retrieval.quote_read(hidden), fetched.raw, fetched.real, bias=fetched.bias)
        query = r.retrieval.previous(hidden) + r.retrieval.quote_write(torch.einsum("btm,btmd->btd", weights,
                                                                                    fetched.raw))
        assert packed.shape == (b, 1, DK + MATCH_TOKENS * (S * D + 1))
        torch.testing.assert_close(packed[..., :DK], query)
        r.retrieval(x, torch.tensor([1]), lookup, r.adapter, previous=packed)
        q, weights = packed[:, 0, :DK], weights[:, 0]  # (B, Dk), (B, M)
        ids = (F.normalize(q, dim=-1) @ lookup.keys.T).topk(3, -1).indices  # (B, k)
        expected = torch.empty(b, 3)
        for row in range(b):
            top = weights[row].topk(MATCH_TOKENS)
            quoted = fetched.raw[row, 0, top.indices].view(MATCH_TOKENS, S, D)
            for j, c in enumerate(ids[row].tolist()):
                chunk = lookup.states[c][lookup.mask[c]]  # (n_real, S, D)
                cos = layer_cosines(quoted, chunk)  # (P, n_real)
                expected[row, j] = q[row] @ lookup.keys[c] + 0.7 * MATCH_GAIN * (top.values * cos.amax(-1)).sum()
    torch.testing.assert_close(lookup.observed[-1][:, 0], expected.log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_matching_the_question_needs_the_store_to_hold_the_memory_layers():
    """A question read at other layers than the store holds cannot be compared token by token."""
    r = twin(model("none"), retrieval_match_question=True)
    _, _, states, mask = inputs()
    with pytest.raises(ValueError, match="the memory must read the layers the store holds"):
        r.retrieval(torch.randn(3, 1, 32), torch.tensor([0]), BruteLookup(), r.adapter,
                    question=states[:, :, :1].flatten(-2), question_mask=mask)


def test_queries_only_every_n_steps():
    r = model(every=2)
    tokens, latent, states, mask = inputs(t=7)
    lookup = BruteLookup()
    with torch.no_grad():
        stepwise(r, tokens, latent, memory(r, states, mask, lookup))
    assert lookup.positions == [[0], [2], [4], [6]]


@pytest.mark.parametrize("adapted", [0, 1])
def test_no_chunk_found_reads_the_question_alone(adapted):
    """With nothing fetched (ids -1), the step computes exactly what it computes without a store
    (also through a memory window and encoder layers, which see an empty chunk: no NaN leaks)."""
    r = model(memory_layers=adapted, memory_window=2 * adapted)
    tokens, latent, states, mask = inputs()
    with torch.no_grad():
        none_found = r(tokens, latent, memory(r, states, mask, BruteLookup(empty=True)))
        no_store = r(tokens, latent, memory(r, states, mask, None))
    torch.testing.assert_close(none_found, no_store, rtol=1e-4, atol=1e-5)


def test_fetched_chunks_change_the_answer_and_their_log_probs_are_observed():
    r = model()
    tokens, latent, states, mask = inputs()
    lookup = BruteLookup()
    with torch.no_grad():
        with_store = r(tokens, latent, memory(r, states, mask, lookup))
        no_store = r(tokens, latent, memory(r, states, mask, None))
    assert (with_store - no_store).abs().max() > 1e-3
    lp = torch.stack(lookup.observed)  # (steps, B, 1, k)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]))


def test_generation_with_a_lookup_matches_row_by_row():
    r = model().eval()
    tokens, latent, states, mask = inputs()
    n_latent = torch.tensor([2, 0, 3])
    batch = r.generate(memory(r, states, mask, BruteLookup()), n_latent, 1, 2, max_new_tokens=4)
    for i in range(3):
        one = r.generate(memory(r, states[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())],
                                BruteLookup()), n_latent[i : i + 1], 1, 2, max_new_tokens=4)
        assert one[0] == batch[i]


def test_retrieval_settings_are_checked():
    with pytest.raises(ValueError, match="retrieval_layer=2"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2, retrieval_layer=2)
    with pytest.raises(ValueError, match="retrieval_every"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2, retrieval_every=0)
    with pytest.raises(ValueError, match="key_dim"):
        Reasoner(ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2), vocab_size=V, memory_dim=D)


def test_weights_of_a_retrieving_reasoner_match_the_plain_one_for_one_seed():
    """The retrieval head is created last: every other weight equals the plain reasoner's."""
    torch.manual_seed(0)
    plain = Reasoner(ReasonerConfig(d_model=32, n_layers=2, n_heads=4), vocab_size=V, memory_dim=D)
    torch.manual_seed(0)
    retr = Reasoner(ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2), vocab_size=V, memory_dim=D,
                    key_dim=DK)
    sd = retr.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(sd[name], value)
    assert {n for n in sd if n not in plain.state_dict()} == {"retrieval.query.weight", "retrieval.kind"}
    with pytest.raises(ValueError, match="retrieval_query"):
        ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2, retrieval_query="next")


def test_an_answer_only_the_store_holds_is_learned_through_retrieval(tmp_path):
    """Two stores give every person another city, and training alternates between them on the
    same questions: without retrieval no model can answer both (the question is the same,
    the answer differs, so at most half right); with retrieval the reasoner learns to read
    the fact from whichever store it is given."""
    from conftest import tiny_memory

    from split_model.retrieval import RetrievalStore
    from split_model.tasks import Example, Task
    from split_model.training import SplitModelModule, TaskDataModule

    names, cities = ["anna", "bert", "carl", "dora", "emil", "fred", "gina", "hugo"], ["oslo", "rome", "lima", "kiev"]
    worlds = {w: {n: cities[(i + shift) % 4] for i, n in enumerate(names)} for w, shift in (("a", 0), ("b", 1))}

    class Facts(Task):
        name = "facts"

        def __init__(self, lives):
            self.lives = lives

        def examples(self, split):
            return [Example(f"where does {n} live?", (f"{n} lives in {c}.",), c) for n, c in self.lives.items()]

    assert all(worlds["a"][n] != worlds["b"][n] for n in names)
    memory = tiny_memory("bert")
    stores = {w: RetrievalStore.build(tmp_path / w, memory, [f"{n} lives in {c}." for n, c in lives.items()])
              for w, lives in worlds.items()}
    torch.manual_seed(0)
    module = SplitModelModule(memory=memory, lr=1e-2, warmup_steps=5, store=str(tmp_path / "a"),
                              reasoner=ReasonerConfig(d_model=32, n_layers=2, n_heads=4, embed_rank=8, retrieval_k=2))
    batches = {}
    for w, lives in worlds.items():
        dm = TaskDataModule(Facts(lives), steps="none", batch_size=8, cache_dir=str(tmp_path / "cache"))
        dm.connect(module)
        dm.setup("fit")
        batches[w] = next(iter(dm.train_dataloader()))
    opt = module.build_optimizer()
    truth = {w: [lives[n] for n in names] for w, lives in worlds.items()}

    def answers() -> dict[str, list[str]]:
        module.eval()
        out = {}
        for w in worlds:
            module.store = stores[w]
            out[w] = module.generate([f"where does {n} live?" for n in names], max_new_tokens=6)
        module.train()
        return out

    # Trained until every answer of both worlds is right, checked every 50 steps, at most 800
    # steps (seeds 0-2 got there by step 200-400; the exact step moves with float rounding).
    module.train()
    for step in range(800):
        w = "ab"[step % 2]
        module.store = stores[w]
        loss = module._forward(batches[w])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 and answers() == truth:
            break
    assert answers() == truth


def _facts_store(tmp_path, memory, name: str = "s"):
    from split_model.retrieval import RetrievalStore

    docs = [f"{n} lives in {c}." for n, c in zip(["anna", "bert", "carl", "dora"], ["oslo", "rome", "lima", "kiev"])]
    return RetrievalStore.build(tmp_path / name, memory, docs), docs


def test_store_lookup_scores_recall_and_teaches_only_when_asked(tmp_path):
    from conftest import tiny_memory

    from split_model.retrieval.lookup import StoreLookup

    import numpy as np

    store, docs = _facts_store(tmp_path, tiny_memory("bert"))
    gold = np.array([[store.find(docs[2]), -1], [store.find(docs[3]), store.find(docs[0])]])
    far = -torch.from_numpy(store.keys(np.array([[2, 2], [3, 0]])).numpy())  # (B=2, T=2, Dk) away from the gold keys
    for teacher in (False, True):
        lookup = StoreLookup(store, 1, "cpu", gold=gold, teacher=teacher)
        got = lookup(far, torch.tensor([0, 1]))
        assert lookup.asked == {0: 2, 1: 1} and lookup.found == {0: 0, 1: 0} and lookup.recall() == 0.0
        ids = got.ids[..., 0].numpy()
        if teacher:  # every gold chunk was put in the (only) slot
            assert (ids[gold >= 0] == gold[gold >= 0]).all()
        else:
            assert not (ids == gold).any()
        assert got.states.shape[:3] == (2, 2, 1) and got.mask.shape[:3] == (2, 2, 1)
    near = store.keys(gold.clip(0))
    lookup = StoreLookup(store, 2, "cpu", gold=gold)
    got = lookup(near, torch.tensor([0, 1]))
    assert lookup.found == lookup.asked == {0: 2, 1: 1} and lookup.recall_by_step() == {0: 1.0, 1: 1.0}
    # The gold-chunk loss: a softmax of query . key over the gold, fetched and random chunks
    # (here the whole store), averaged over the 3 gold steps; it pulls queries to their gold keys.
    for scale, low in ((1000.0, True), (-1000.0, False)):  # random-backbone keys are close: large scales
        q = (scale * near).requires_grad_()
        lookup = StoreLookup(store, 2, "cpu", gold=gold)
        lookup.observe(torch.tensor([0, 1]), got.ids, torch.zeros(2, 2, 2), q)
        loss = lookup.loss()
        assert (loss < 0.1) if low else (loss > 5)
        loss.backward()
        step = -q.grad[gold >= 0]  # descent direction per gold step
        assert ((step * near[gold >= 0]).sum(-1) >= -1e-4).all()
    assert StoreLookup(store, 2, "cpu").loss() is None


def test_pick_loss_is_minus_log_the_fetched_gold_chunks_share(tmp_path):
    """Where a step fetched its gold chunk, the pick loss adds -log of that chunk's share, of the
    reasoner's preference (observe's log p) and of the quote (observe_quote's shares); a step
    whose gold chunk was not fetched, or that has none, adds nothing. pick_share is the mean p."""
    from conftest import tiny_memory

    from split_model.retrieval.lookup import StoreLookup

    import numpy as np

    store, docs = _facts_store(tmp_path, tiny_memory("bert"))
    gold = np.array([[store.find(docs[2]), -1], [store.find(docs[3]), store.find(docs[0])]])
    g00, g10, g11 = (int(i) for i in (gold[0, 0], gold[1, 0], gold[1, 1]))
    others = [i for i in range(4) if i not in (g00, g10, g11)]  # one chunk is none of the three
    ids = torch.tensor([[[g00, g10], [g10, g11]], [[g00, others[0]], [g00, g11]]])  # gold fetched at (0,0) and (1,1)
    log_p = torch.log(torch.tensor([[[0.8, 0.2], [0.5, 0.5]], [[0.5, 0.5], [0.3, 0.7]]])).requires_grad_()
    lookup = StoreLookup(store, 2, "cpu", gold=gold)
    assert lookup.pick_loss() is None and lookup.pick_share() is None
    lookup.observe(torch.tensor([0, 1]), ids, log_p, torch.zeros(2, 2, store.key_dim, requires_grad=True))
    torch.testing.assert_close(lookup.pick_loss(), -(torch.tensor(0.8).log() + torch.tensor(0.7).log()) / 2)
    assert lookup.pick_share() == pytest.approx(0.75)
    shares = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.1, 0.9]]], requires_grad=True)
    lookup.observe_quote(torch.tensor([0, 1]), ids, shares)
    expected = -(np.log(0.8) + np.log(0.7) + np.log(0.5) + np.log(0.9)) / 4
    assert float(lookup.pick_loss()) == pytest.approx(expected, rel=1e-5)
    assert lookup.pick_share() == pytest.approx(0.75)  # the chunks' preference only
    lookup.pick_loss().backward()
    assert log_p.grad[0, 0, 0] < 0 and log_p.grad[1, 1, 1] < 0 and log_p.grad.count_nonzero() == 2
    assert shares.grad.count_nonzero() == 2


def test_a_retrieving_model_needs_a_store_and_refuses_one_it_cannot_use(tmp_path):
    from conftest import tiny_memory

    from split_model.training import SplitModelModule

    memory = tiny_memory("bert")
    _facts_store(tmp_path, memory)
    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2)
    with pytest.raises(ValueError, match="needs a retrieval store: set model.store"):
        SplitModelModule(memory=memory, reasoner=cfg)
    with pytest.raises(ValueError, match="retrieval_k is 0"):
        SplitModelModule(memory=memory, reasoner=ReasonerConfig(d_model=32, n_layers=2, n_heads=4),
                         store=str(tmp_path / "s"))
    with pytest.raises(ValueError):  # a store written by another backbone
        SplitModelModule(memory=tiny_memory("bert", seed=1), reasoner=cfg, store=str(tmp_path / "s"))
    module = SplitModelModule(memory=memory, reasoner=cfg, store=str(tmp_path / "s"))
    assert module.reasoner.retrieval.query.out_features == module.store.key_dim == memory.hidden_size


def test_gold_chunks_follow_the_querying_steps(tmp_path):
    from conftest import tiny_memory

    from split_model.tasks import Example
    from split_model.training import SplitModelModule

    memory = tiny_memory("bert")
    store, docs = _facts_store(tmp_path, memory)
    module = SplitModelModule(memory=memory, store=str(tmp_path / "s"),
                              reasoner=ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2,
                                                      retrieval_every=2))
    examples = [Example("q1", (docs[1], docs[3]), "x"), Example("q2", ("not in the store", docs[0]), "y")]
    gold = module.gold_chunks(examples)
    ids = [store.find(d) for d in docs]
    assert gold.tolist() == [[ids[1], -1, ids[3], -1], [-1, -1, ids[0], -1]]
    assert module.gold_chunks([Example("q", ("nowhere",), "z")]) is None


def test_the_pick_loss_joins_the_training_loss_with_its_weight(tmp_path):
    """model.retrieval_pick_loss w adds w times the lookup's pick loss (gold chunks are known:
    each question's step is a fact of the store, slipped in by the teacher where missed); a
    negative weight is refused."""
    from conftest import tiny_memory

    from split_model.tasks import Example, Task
    from split_model.training import SplitModelModule, TaskDataModule

    memory = tiny_memory("bert")
    _, docs = _facts_store(tmp_path, memory)

    class Facts(Task):
        name = "facts"

        def examples(self, split):
            return [Example(f"where does {d.split()[0]} live?", (d,), d.split()[-1][:-1]) for d in docs]

    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, embed_rank=8, retrieval_k=2, retrieval_query="previous",
                         retrieval_quote=True)
    with pytest.raises(ValueError, match="retrieval_pick_loss must be >= 0"):
        SplitModelModule(memory=memory, reasoner=cfg, store=str(tmp_path / "s"), retrieval_pick_loss=-1.0)
    torch.manual_seed(0)
    module = SplitModelModule(memory=memory, reasoner=cfg, store=str(tmp_path / "s"), retrieval_pick_loss=0.0)
    dm = TaskDataModule(Facts(), steps="none", latent_steps=2, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.connect(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    losses = {}
    for w in (0.0, 1.0, 3.0):
        module.hparams.retrieval_pick_loss = w
        losses[w] = module._forward(batch)[0].item()
    pick = losses[1.0] - losses[0.0]
    assert pick > 0.05  # -log of a share below 1: each question's first step has a gold chunk (its fact)
    assert losses[3.0] - losses[0.0] == pytest.approx(3 * pick, rel=1e-4)


def test_checkpoint_of_a_retrieving_model_reopens_its_store_or_another(tmp_path, capsys):
    from conftest import tiny_data, tiny_memory, tiny_trainer

    from split_model.training import SplitModelModule
    from split_model.training.module import load_checkpoint

    memory = tiny_memory("bert")
    _facts_store(tmp_path, memory, "a")
    _facts_store(tmp_path, memory, "b")
    module = SplitModelModule(memory=memory, store=str(tmp_path / "a"), warmup_steps=1,
                              reasoner=ReasonerConfig(d_model=32, n_layers=2, n_heads=4, retrieval_k=2))
    dm = tiny_data(module, tmp_path / "cache", steps="none", latent_steps=2)
    trainer = tiny_trainer(tmp_path / "run", max_steps=2, limit_val_batches=1)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    same = load_checkpoint(str(tmp_path / "m.ckpt"), memory=memory)
    assert same.store.path == module.store.path
    for name, value in module.reasoner.state_dict().items():
        torch.testing.assert_close(same.reasoner.state_dict()[name], value)
    other = load_checkpoint(str(tmp_path / "m.ckpt"), memory=memory, store=str(tmp_path / "b"))
    assert other.store.path.name == "b"
    assert other.generate(["1 2 0"], n_latent=2, max_new_tokens=3) is not None
    from split_model.cli import dispatch

    answers = dispatch(["generate", "--checkpoint", str(tmp_path / "m.ckpt"), "--store", str(tmp_path / "b"),
                        "--question", "1 2 0", "--device", "cpu", "--max-new-tokens", "3"])
    assert answers == other.generate(["1 2 0"], n_latent=2, max_new_tokens=3)
    with pytest.raises(SystemExit):
        dispatch(["generate", "--checkpoint", str(tmp_path / "m.ckpt"), "--store", str(tmp_path / "nowhere"),
                  "--question", "1 2 0", "--device", "cpu"])
    assert "no retrieval store at" in capsys.readouterr().err
