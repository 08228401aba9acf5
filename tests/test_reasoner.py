"""The recurrent reasoner: the step API equals the training forward, feedback starts off
and then carries step t into step t+1, gradients reach it (and stop where BPTT is
truncated), padded memory is ignored, and greedy generation is what the steps say."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from split_model.reasoner import Reasoner, ReasonerConfig

MODES = ("none", "last", "all", "all+tokens")  # all+tokens: feedback all with feedback_tokens
VOCAB, MEM_DIM, MEM_STATES, D = 40, 12, 2, 32


def gate_parameters(model: Reasoner) -> list[torch.Tensor]:
    """The feedback gates' weights, whatever their shape (scalar, per channel or a matrix)."""
    gates = [g for g in (model.feedback.gate, model.feedback.token_gate) if g is not None]
    return [p for g in gates for p in ([g] if isinstance(g, torch.Tensor) else g.parameters())]


def make_reasoner(feedback: str, seed: int = 0, gate: float | None = 0.7) -> Reasoner:
    """A tiny reasoner; feedback "all+tokens" is feedback all with feedback_tokens. Unless
    `gate` is None, the feedback gates are set to that openness (0 shuts them) and the layer
    mix is randomised."""
    torch.manual_seed(seed)
    mode, _, tokens = feedback.partition("+")
    cfg = ReasonerConfig(d_model=D, n_layers=2, n_heads=4, embed_rank=8, feedback=mode, feedback_tokens=tokens == "tokens")
    model = Reasoner(cfg, vocab_size=VOCAB, memory_dim=MEM_DIM, num_states=MEM_STATES)
    if gate is not None and model.feedback is not None:
        with torch.no_grad():
            for p in gate_parameters(model):
                if p.ndim == 2:  # a gating matrix: random, scaled so the output stays O(gate)
                    p.normal_(std=gate / p.shape[1] ** 0.5)
                else:
                    p.fill_(gate)
            if model.feedback.mix is not None:
                model.feedback.mix.normal_()
    return model


def memory_inputs(b: int = 3, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, S, D_mem) states and a (B, N) mask with padding in rows 1 and 2."""
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b, n, MEM_STATES, MEM_DIM, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return states, mask


def step_inputs(b: int = 3, t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and a (B, T) latent flag mixing latent and token positions."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    latent = torch.zeros(b, t, dtype=torch.bool)
    latent[:, :2] = True
    latent[0, 3] = True
    latent[2, 4] = True
    return tokens, latent


def memory(model: Reasoner, states=None, mask=None):
    if states is None:
        states, mask = memory_inputs()
    return model.encode_memory(states, mask)


def step_loop(model: Reasoner, mem, tokens, latent) -> torch.Tensor:
    """(B, T, V) logits of T calls of `step`, carrying the KV cache and feedback."""
    state, out = model.start(mem), []
    for t in range(tokens.shape[1]):
        logits, state = model.step(state, tokens[:, t], latent[:, t])
        out.append(logits)
    return torch.stack(out, dim=1)


def uncached_reference(model: Reasoner, mem, tokens, latent) -> torch.Tensor:
    """The recurrence without a KV cache: step t re-runs positions 0..t in one parallel pass,
    each position given the feedback its predecessor produced."""
    b, steps = tokens.shape
    feedback = [torch.zeros(b, 1, D)]  # position 0 has no predecessor
    out = []
    for t in range(steps):
        fb = torch.cat(feedback, dim=1) if model.feedback is not None else None
        hidden, states, *_ = model.run(tokens[:, : t + 1], latent[:, : t + 1], mem, None, fb)
        out.append(model.logits(hidden[:, -1]))
        if model.feedback is not None:
            feedback.append(model.feedback(states[:, :, -1:]))
    return torch.stack(out, dim=1)


# -- one model, three ways to run it -------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_step_with_kv_cache_equals_forward(mode):
    model = make_reasoner(mode)
    mem, (tokens, latent) = memory(model), step_inputs()
    with torch.no_grad():
        stepped = step_loop(model, mem, tokens, latent)
        torch.testing.assert_close(stepped, model(tokens, latent, mem))
        torch.testing.assert_close(stepped, uncached_reference(model, mem, tokens, latent))


@pytest.mark.parametrize("mode", ["last", "all", "all+tokens"])
def test_fresh_feedback_model_computes_what_none_computes(mode):
    plain, fed = make_reasoner("none", gate=None), make_reasoner(mode, gate=None)
    assert not any(p.any() for p in gate_parameters(fed))
    fed_weights = fed.state_dict()
    for name, weight in plain.state_dict().items():
        assert torch.equal(fed_weights[name], weight), name
    (tokens, latent) = step_inputs()
    with torch.no_grad():
        assert torch.equal(step_loop(fed, memory(fed), tokens, latent), step_loop(plain, memory(plain), tokens, latent))
        torch.testing.assert_close(fed(tokens, latent, memory(fed)), plain(tokens, latent, memory(plain)))


# -- feedback carries step t into step t+1 ---------------------------------------------------------
@pytest.mark.parametrize("output_vocab", [None, [3, 5, 7, 11, 39]])
def test_token_feedback_hands_the_next_step_the_embedding_its_output_distribution_expects(output_vocab):
    model = make_reasoner("all+tokens", gate=0.0)  # the layer-state gate shut: only the tokens' path is open
    if output_vocab is not None:
        model.set_output_vocab(torch.tensor(output_vocab))
    with torch.no_grad():
        model.feedback.token_gate.weight.copy_(torch.eye(D))
    tokens, latent = step_inputs()
    _, state = model.step(model.start(memory(model)), tokens[:, 0], latent[:, 0])
    last = state.layer_states[-1]  # (B, 1, d)
    probs = model.logits(model.norm(last)).softmax(-1)  # (B, 1, V or K)
    ids = torch.arange(VOCAB) if output_vocab is None else torch.tensor(output_vocab)
    want = torch.einsum("btk,kd->btd", probs, model.embed(ids))  # sum_i p_i E_i
    torch.testing.assert_close(model.feedback(state.layer_states), want)
    assert (probs.amax(-1) < 0.9).all()  # a spread distribution: the mixture differs from any one row
    assert all((want - model.embed(i)).abs().amax() > 1e-3 for i in ids)


def test_token_feedback_needs_a_feedback_path():
    with pytest.raises(ValueError, match="feedback_tokens .* needs feedback last or all"):
        ReasonerConfig(feedback="none", feedback_tokens=True)


def _two_steps(model: Reasoner, states_at_0=None):
    """Logits of step 1, optionally with step 0's layer states replaced (its KV cache kept)."""
    tokens, latent = step_inputs()
    _, state = model.step(model.start(memory(model)), tokens[:, 0], latent[:, 0])
    if states_at_0 is not None:
        state = replace(state, layer_states=states_at_0(state.layer_states))
    logits, _ = model.step(state, tokens[:, 1], latent[:, 1])
    return logits


@pytest.mark.parametrize("mode", ["last", "all"])
def test_open_feedback_carries_step_t_into_step_t_plus_1(mode):
    noise = torch.randn(3, 2 + 1, 1, D, generator=torch.Generator().manual_seed(3)).transpose(0, 1)  # (L+1, B, 1, d)
    with torch.no_grad():
        shut = make_reasoner(mode, gate=0.0)
        assert torch.equal(_two_steps(shut), _two_steps(shut, lambda s: s + noise))
        opened = make_reasoner(mode, gate=0.7)
        assert not torch.allclose(_two_steps(opened), _two_steps(opened, lambda s: s + noise))


@pytest.mark.parametrize("mode", ["last", "all"])
def test_step_t_plus_1_loss_reaches_the_layers_feedback_reads(mode):
    model = make_reasoner(mode)
    leaf = {}

    def track(states):
        leaf["states"] = states.detach().requires_grad_()
        return leaf["states"]

    logits = _two_steps(model, track)
    F.cross_entropy(logits, torch.arange(3)).backward()
    per_layer = leaf["states"].grad.flatten(1).abs().sum(1)  # (L+1,) gradient reaching each layer's state
    assert per_layer[-1] > 0
    if mode == "all":
        assert (per_layer > 0).all()
    else:  # `last` reads the final block only
        assert (per_layer[:-1] == 0).all()


@pytest.mark.parametrize("gate", [0.0, 0.7])
@pytest.mark.parametrize("mode", ["last", "all"])
def test_gradients_reach_the_feedback_parameters(mode, gate):
    model = make_reasoner(mode, gate=gate)
    tokens, latent = step_inputs()
    logits = model(tokens, latent, memory(model))
    F.cross_entropy(logits[:, -1], torch.arange(3)).backward()
    fb = model.feedback
    gate_grads = [p.grad for p in gate_parameters(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)  # a shut gate can still learn to open
    if gate:  # behind an open gate, the rest of the feedback path learns too
        assert fb.proj.weight.grad.abs().sum() > 0
        assert fb.norm.weight.grad.abs().sum() > 0
        if mode == "all":
            assert fb.mix.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bptt_steps, latent_at, reaches",
    [(None, 0, True), (1, 0, False), (1, 5, True), (3, 3, True), (3, 2, False)],
)
@pytest.mark.parametrize("mode", ["last", "all"])
def test_truncated_bptt_cuts_the_gradient_at_window_starts(mode, bptt_steps, latent_at, reaches):
    """The last step's loss reaches the input of step `latent_at` (the only latent step) only
    inside its window: windows start at multiples of bptt_steps."""
    model = make_reasoner(mode)
    tokens, _ = step_inputs(t=6)
    latent = torch.zeros_like(tokens, dtype=torch.bool)
    latent[:, latent_at] = True
    mem = memory(model)
    logits = model(tokens, latent, mem, bptt_steps=bptt_steps)
    with torch.no_grad():  # truncation changes gradients, never values
        torch.testing.assert_close(logits, model(tokens, latent, mem))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits[:, -1], torch.arange(3)), model.latent_input, allow_unused=True)
    got = grad is not None and bool(grad.abs().sum() > 0)
    assert got == reaches


# -- memory padding ------------------------------------------------------------------------------
def assert_padding_changes_nothing(model: Reasoner, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits with padding that holds noise and with 5 more padded tokens equal those of
    (states, mask); returns those logits."""
    tokens, latent = step_inputs()
    g = torch.Generator().manual_seed(4)
    noisy = torch.where(mask[..., None, None], states, 100 * torch.randn(states.shape, generator=g))
    longer = torch.cat([noisy, torch.randn(3, 5, MEM_STATES, MEM_DIM, generator=g)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        want = model(tokens, latent, memory(model, states, mask))
        torch.testing.assert_close(model(tokens, latent, memory(model, longer, longer_mask)), want)
    return want


@pytest.mark.parametrize("mode", MODES)
def test_masked_memory_positions_change_nothing(mode):
    model = make_reasoner(mode)
    states, mask = memory_inputs()
    tokens, latent = step_inputs()
    want = assert_padding_changes_nothing(model, states, mask)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        moved = states.clone()
        # A real memory token does matter. (Not a shift: the adapter's LayerNorm removes it.)
        moved[0, 0] = torch.randn(moved[0, 0].shape, generator=g)
        assert not torch.allclose(model(tokens, latent, memory(model, moved, mask)), want, atol=1e-3)


# -- memory window and encoder layers ---------------------------------------------------------------
def adapted_reasoner(layers: int = 0, window: int = 0, seed: int = 0, mixing: bool = True) -> Reasoner:
    """make_reasoner("all") with memory encoder layers and a memory window, their weights
    randomised (mixing) or as initialised."""
    torch.manual_seed(seed)
    cfg = ReasonerConfig(d_model=D, n_layers=2, n_heads=4, embed_rank=8, feedback="all", memory_layers=layers,
                         memory_window=window)
    model = Reasoner(cfg, vocab_size=VOCAB, memory_dim=MEM_DIM, num_states=MEM_STATES)
    if mixing:
        with torch.no_grad():
            for part in (model.adapter.encoder, model.adapter.window):
                for p in [] if part is None else part.parameters():
                    p.normal_(0, 0.3)
    return model


ADAPTED = [pytest.param({"layers": 2}, "adapter.encoder.", id="layers"),
           pytest.param({"window": 2}, "adapter.window.", id="window")]


@pytest.mark.parametrize("kwargs, prefix", ADAPTED)
def test_fresh_memory_window_and_encoder_are_the_identity_and_add_only_their_weights(kwargs, prefix):
    plain, adapted = adapted_reasoner(mixing=False), adapted_reasoner(**kwargs, mixing=False)
    want = dict(plain.named_parameters())
    extra = [n for n, _ in adapted.named_parameters() if n not in want]
    assert extra and all(n.startswith(prefix) for n in extra)
    for name, p in adapted.named_parameters():
        if name in want:
            assert torch.equal(p, want[name]), name
    tokens, latent = step_inputs()
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens, latent, memory(adapted)), plain(tokens, latent, memory(plain)))


@pytest.mark.parametrize("kwargs, reach", [({"layers": 2}, 6), ({"window": 2}, 2)])
def test_adapted_memory_mixes_real_tokens_in_reach_and_ignores_padding(kwargs, reach):
    """A memory token's adapted state depends on the other real tokens within reach (all of
    them through encoder layers, `window` either side through a window; none without
    either), and never on padding, whatever it holds or however long it is."""
    model, plain = adapted_reasoner(**kwargs), adapted_reasoner(mixing=False)
    states, mask = memory_inputs()
    with torch.no_grad():
        before = model.adapter(states, mask)
        for j in range(1, states.shape[1]):
            moved = states.clone()
            moved[0, j] = torch.randn(moved[0, j].shape, generator=torch.Generator().manual_seed(j))
            assert torch.allclose(model.adapter(moved, mask)[0, 0], before[0, 0], atol=1e-4) == (j > reach), j
            torch.testing.assert_close(plain.adapter(moved, mask)[0, 0], plain.adapter(states, mask)[0, 0])
    assert_padding_changes_nothing(model, states, mask)


@pytest.mark.parametrize("kwargs, part", [({"layers": 1}, "encoder"), ({"window": 2}, "window")])
def test_gradients_reach_every_memory_window_and_encoder_weight(kwargs, part):
    model = adapted_reasoner(**kwargs)
    tokens, latent = step_inputs()
    F.cross_entropy(model(tokens, latent, memory(model)).flatten(0, 1), tokens.flatten()).backward()
    for name, p in getattr(model.adapter, part).named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_context_with_no_real_token_stays_finite():
    model = adapted_reasoner(layers=1, window=2)
    states, mask = memory_inputs()
    mask[2] = False
    with torch.no_grad():
        out = model.adapter(states, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], model.adapter(states[:2], mask[:2]))


# -- greedy generation -----------------------------------------------------------------------------
BOS = 1


def test_generate_is_greedy_decoding_after_the_latent_steps():
    model = make_reasoner("all")
    mem = memory(model)
    n_latent = torch.tensor([0, 2, 1])
    out = model.generate(mem, n_latent, bos_id=BOS, eos_id=-1, max_new_tokens=4)
    assert [len(x) for x in out] == [4, 4, 4]
    # Row 1 by hand: two latent steps, then bos, then each greedy token fed back.
    state, nxt, written = model.start(mem), None, []
    with torch.no_grad():
        for t in range(2 + 4):
            latent = torch.full((3,), t < 2)
            token = torch.full((3,), BOS if t <= 2 else nxt)
            logits, state = model.step(state, token, latent)
            nxt = int(logits[1].argmax())
            if t >= 2:
                written.append(nxt)
    assert out[1] == written


def test_generate_rows_in_one_batch_match_rows_alone():
    model = make_reasoner("all")
    states, mask = memory_inputs()
    n_latent = torch.tensor([0, 3, 1])
    batch = model.generate(memory(model, states, mask), n_latent, bos_id=BOS, eos_id=-1, max_new_tokens=5)
    for i in range(3):
        alone = model.generate(memory(model, states[i : i + 1], mask[i : i + 1]), n_latent[i : i + 1],
                               bos_id=BOS, eos_id=-1, max_new_tokens=5)
        assert batch[i] == alone[0]


def test_generate_stops_at_eos_and_leaves_it_out():
    model = make_reasoner("last")
    mem = memory(model)
    n_latent = torch.tensor([1, 1, 1])
    free = model.generate(mem, n_latent, bos_id=BOS, eos_id=-1, max_new_tokens=6)
    eos = free[0][2]
    stopped = model.generate(mem, n_latent, bos_id=BOS, eos_id=eos, max_new_tokens=6)
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(eos)] if eos in full else full)


# -- config errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "n_heads": 4}, r"d_model=30 is not divisible by n_heads=4"),
        ({"d_model": 12, "n_heads": 4}, r"d_model/n_heads=3 must be even"),
        ({"n_layers": 0}, r"must be positive.*n_layers=0"),
        ({"feedback": "some"}, r"none, last, all.*'some'"),
        ({"mlp_ratio": 0}, r"mlp_ratio must be positive, got 0"),
        ({"memory_layers": -1}, r"memory_layers and memory_window must be >= 0, got -1, 0"),
        ({"memory_window": -2}, r"memory_layers and memory_window must be >= 0, got 0, -2"),
    ],
)
def test_bad_reasoner_config_quotes_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReasonerConfig(**kwargs)
