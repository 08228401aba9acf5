"""The fixed-shape reasoner (preallocated caches written in place, no host syncs) computes
what the dynamic reference computes: logits and gradients of training, every step of
generation, for every feedback mode, padded memory and per-row latent counts; its
training memory grows linearly with the number of steps; sampling is reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_reasoner import BOS, MODES, make_reasoner, memory, step_inputs

from split_model.reasoner import Sampling, StaticDecoder
from split_model.reasoner.graphs import graphed_or_eager


def loss_and_grads(model, fn, tokens, latent, bptt_steps=None):
    """Logits of fn and the gradient of a loss over every position, per parameter."""
    model.zero_grad()
    logits = fn(tokens, latent, memory(model), bptt_steps)
    targets = torch.arange(tokens.numel()).view(tokens.shape) % logits.shape[-1]
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("output_vocab", [False, True])
@pytest.mark.parametrize("bptt_steps", [None, 1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_fixed_shape_training_equals_the_dynamic_recurrence(mode, bptt_steps, output_vocab):
    """Padded memory (rows 1, 2) and latent steps at different positions per row (step_inputs)."""
    model = make_reasoner(mode)
    if output_vocab:
        model.set_output_vocab(torch.tensor([3, 5, 7, 11, 39]))
    tokens, latent = step_inputs(t=7)
    want, want_grads = loss_and_grads(model, model.forward_dynamic, tokens, latent, bptt_steps)
    got, got_grads = loss_and_grads(model, model.forward, tokens, latent, bptt_steps)
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_fixed_shape_step_equals_the_dynamic_step(mode):
    model = make_reasoner(mode)
    tokens, latent = step_inputs(t=6)
    mem = memory(model)
    static, dynamic = model.decoder(mem, 9, "static"), model.decoder(mem, 9, "dynamic")
    assert isinstance(static, StaticDecoder)
    with torch.no_grad():
        for t in range(6):
            torch.testing.assert_close(static.step(tokens[:, t], latent[:, t]), dynamic.step(tokens[:, t], latent[:, t]))
    assert int(static.pos) == 6


def test_reset_decoder_starts_over():
    model = make_reasoner("all")
    tokens, latent = step_inputs(t=5)
    dec = model.decoder(memory(model), 5)
    with torch.no_grad():
        first = [dec.step(tokens[:, t], latent[:, t]) for t in range(5)]
        dec.reset()
        again = [dec.step(tokens[:, t], latent[:, t]) for t in range(5)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_static_generation_writes_what_the_dynamic_reference_writes(mode):
    model = make_reasoner(mode)
    mem = memory(model)
    n_latent = torch.tensor([0, 3, 1])
    free = model.generate(mem, n_latent, bos_id=BOS, eos_id=-1, max_new_tokens=6, decoder="dynamic")
    eos = free[1][2]  # a token some row writes: rows stop at different steps
    for eos_id in (-1, eos):
        want = model.generate(mem, n_latent, bos_id=BOS, eos_id=eos_id, max_new_tokens=6, decoder="dynamic")
        for check_every in (1, 16):
            got = model.generate(mem, n_latent, bos_id=BOS, eos_id=eos_id, max_new_tokens=6, check_every=check_every)
            assert got == want


def test_the_step_has_no_host_sync_or_data_dependent_python():
    """The whole step traces into one graph: nothing reads a tensor value on the host,
    which is what CUDA graph capture needs."""
    model = make_reasoner("all")
    dec = model.decoder(memory(model), 8)
    tokens, latent = step_inputs(t=5)
    traced = torch.compile(dec.step, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        got = [traced(tokens[:, t], latent[:, t]) for t in range(5)]
        ref = model.decoder(memory(model), 8)
        want = [ref.step(tokens[:, t], latent[:, t]) for t in range(5)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_graph_capture_failure_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    """On a machine without CUDA, capture fails: generation still works, eagerly, and later
    calls neither try again nor warn again."""
    import warnings

    from split_model.reasoner import graphs

    monkeypatch.setattr(graphs, "_warned", set())
    model = make_reasoner("all")
    dec = model.decoder(memory(model), 6)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the reasoner step failed"):
        fallback = graphed_or_eager(dec)
    assert fallback is dec and int(dec.pos) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphed_or_eager(dec) is dec
    # A CPU memory never attempts capture, so generation with decoder="graphs" is the static path.
    n_latent = torch.tensor([1, 0, 2])
    mem = memory(model)
    assert model.generate(mem, n_latent, BOS, -1, 4, decoder="graphs") == model.generate(mem, n_latent, BOS, -1, 4)


def saved_bytes(model, steps: int, fn) -> int:
    """Bytes autograd keeps for backward over a `steps`-step sequence."""
    tokens, latent = step_inputs(t=steps)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(tokens, latent, memory(model))
    return total


def per_step_growth(model, fn) -> float:
    """Bytes saved per added step from 64 to 128 steps, over the same from 32 to 64: 1 when
    memory grows linearly with the number of steps, more when it grows faster."""
    s32, s64, s128 = (saved_bytes(model, t, fn) for t in (32, 64, 128))
    return ((s128 - s64) / 64) / ((s64 - s32) / 32)


def test_training_memory_grows_linearly_with_steps():
    """The dynamic cache keeps a copy of every past key per step (T^2); the in-place one does not."""
    model = make_reasoner("all")
    assert per_step_growth(model, model.forward) == pytest.approx(1.0, abs=0.01)
    assert per_step_growth(model, model.forward_dynamic) > 1.2


# -- sampling ---------------------------------------------------------------------------------------
def test_greedy_top_k_1_and_tiny_top_p_choose_the_argmax():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1)
    for s in (Sampling(), Sampling(temperature=1.0, top_k=1, seed=0), Sampling(temperature=2.0, top_p=1e-6, seed=0)):
        assert torch.equal(s.chooser("cpu")(logits), want)


def test_top_k_and_top_p_keep_exactly_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (Sampling(temperature=1.0, top_k=2).probs(logits) > 0).tolist() == [[True, True, False, False]]
    assert (Sampling(temperature=1.0, top_p=0.8).probs(logits) > 0).tolist() == [[True, True, False, False]]
    assert (Sampling(temperature=1.0, top_p=0.81).probs(logits) > 0).tolist() == [[True, True, True, False]]
    torch.testing.assert_close(Sampling(temperature=1.0).probs(logits), logits.exp())


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    model = make_reasoner("all", gate=0.0)
    with torch.no_grad():
        model.embed.up.mul_(0.01)  # flat logits: sampling must wander off the argmax
    mem, n_latent = memory(model), torch.tensor([1, 0, 2])
    hot = Sampling(temperature=1.0, seed=7)
    a = model.generate(mem, n_latent, BOS, -1, 8, sampling=hot)
    assert a == model.generate(mem, n_latent, BOS, -1, 8, sampling=hot)
    assert a != model.generate(mem, n_latent, BOS, -1, 8, sampling=Sampling(temperature=1.0, seed=8))
    assert a != model.generate(mem, n_latent, BOS, -1, 8)


@pytest.mark.parametrize("kwargs, message", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                             ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_streaming_sees_every_written_id_once():
    model = make_reasoner("last")
    mem, n_latent = memory(model), torch.tensor([2, 0, 1])
    seen = [[] for _ in range(3)]

    def on_token(ids, writing):
        for i in torch.nonzero(writing).flatten().tolist():
            seen[i].append(int(ids[i]))

    out = model.generate(mem, n_latent, BOS, -1, 5, on_token=on_token)
    assert seen == out and all(len(x) == 5 for x in out)


# -- fused elementwise chains ------------------------------------------------------------------------
def test_fused_functions_have_the_exact_gradients():
    from split_model.reasoner.fused import RMSNormFn, RotaryFn, SwiGLUFn

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.randn(2, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(SwiGLUFn.apply, (x,))
    assert torch.autograd.gradcheck(lambda x: RotaryFn.apply(x, angles.cos(), angles.sin()), (x,))


def test_fused_functions_compute_what_the_modules_compute():
    from split_model.reasoner.fused import SwiGLUFn, rms_norm
    from split_model.reasoner.layers import rotary
    from split_model.reasoner.static import rotate

    model = make_reasoner("all")
    blk = model.blocks[0]
    with torch.no_grad():
        blk.norm1.weight.normal_()
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(rms_norm(blk.norm1, x), blk.norm1(x))
    h = blk.mlp.up(x)
    a, b = h.chunk(2, dim=-1)
    torch.testing.assert_close(SwiGLUFn.apply(h), F.silu(a) * b)
    tables = model.position_tables(8, "cpu")
    heads = x.view(3, 4, 4, 8).transpose(1, 2)  # (B, H, T, dh)
    torch.testing.assert_close(rotate(heads, tables.cos[2:6], tables.sin[2:6]), rotary(heads, 2, model.cfg.rope_base))


def test_failed_compilation_falls_back_to_the_plain_graph_with_one_warning(monkeypatch):
    """execution: compiled on a GPU where torch.compile fails: the step is captured uncompiled."""
    import warnings

    from split_model.reasoner import graphs

    made = []

    class Captured:  # stands in for a CUDA capture, which this CPU cannot do
        def __init__(self, decoder, compile=False):
            if compile:
                raise RuntimeError("inductor: no C++ compiler")
            made.append(decoder)

    monkeypatch.setattr(graphs, "_warned", set())
    monkeypatch.setattr(graphs, "GraphedDecoder", Captured)
    model = make_reasoner("all")
    dec = model.decoder(memory(model), 6)
    with pytest.warns(RuntimeWarning, match="compilation and capture of the reasoner step failed.*no C\\+\\+ compiler"):
        assert isinstance(graphed_or_eager(dec, compile=True), Captured)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second compile attempt
        assert isinstance(graphed_or_eager(dec, compile=True), Captured)
    assert made == [dec, dec]
