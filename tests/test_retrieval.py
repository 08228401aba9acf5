"""Retrieval inside the reasoner: the query, the fetched chunks in cross-attention, and the
Lookup interface (here a brute-force lookup over random chunks; the faiss store has its own tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from split_model.reasoner import Reasoner, ReasonerConfig
from split_model.reasoner.retrieval import Retrieved

C, N_TOK, S, D, DK, V = 40, 6, 1, 16, 12, 30


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

    def __call__(self, queries, positions):
        self.positions.append(positions.tolist())
        ids = (F.normalize(queries, dim=-1) @ self.keys.T).topk(self.k, -1).indices  # (B, T, k)
        if self.empty:
            ids = torch.full_like(ids, -1)
        safe = ids.clamp_min(0)
        mask = self.mask[safe] & (ids >= 0)[..., None]
        return Retrieved(ids=ids, keys=self.keys[safe], states=self.states[safe], mask=mask)

    def observe(self, positions, ids, log_probs):
        self.observed.append(log_probs)


def model(feedback: str = "all", every: int = 1, layer: int = 1, seed: int = 0) -> Reasoner:
    torch.manual_seed(seed)
    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, feedback=feedback, retrieval_k=3,
                         retrieval_every=every, retrieval_layer=layer)
    r = Reasoner(cfg, vocab_size=V, memory_dim=D, num_states=S, key_dim=DK)
    if r.feedback is not None:
        with torch.no_grad():
            r.feedback.gate.weight.normal_(0, 0.2)  # open, so the feedback path matters
    return r


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


@pytest.mark.parametrize("feedback", ["none", "all"])
def test_training_forward_equals_generation_steps(feedback):
    """Without feedback the forward is one parallel pass (one search for every position);
    it must compute what the recurrent steps compute, one search per step."""
    r = model(feedback)
    tokens, latent, states, mask = inputs()
    parallel = BruteLookup()
    out = r(tokens, latent, memory(r, states, mask, parallel))
    with torch.no_grad():
        ref = stepwise(r, tokens, latent, memory(r, states, mask, BruteLookup()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(parallel.positions) == (1 if feedback == "none" else tokens.shape[1])


def test_queries_only_every_n_steps():
    r = model(every=2)
    tokens, latent, states, mask = inputs(t=7)
    lookup = BruteLookup()
    with torch.no_grad():
        stepwise(r, tokens, latent, memory(r, states, mask, lookup))
    assert lookup.positions == [[0], [2], [4], [6]]


def test_no_chunk_found_reads_the_question_alone():
    """With nothing fetched (ids -1), the step computes exactly what it computes without a store."""
    r = model()
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
