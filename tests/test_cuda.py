"""CUDA only (skipped elsewhere): the graph-captured paths compute what the eager
fixed-shape path computes. Run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_reasoner import BOS, MODES, make_reasoner, memory_inputs, step_inputs

from split_model.reasoner.graphs import GraphedDecoder, GraphedTraining

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def on_cuda(mode: str):
    model = make_reasoner(mode).to(CUDA)
    states, mask = (x.to(CUDA) for x in memory_inputs())
    tokens, latent = (x.to(CUDA) for x in step_inputs(t=6))
    return model, states, mask, tokens, latent


@pytest.mark.parametrize("mode", MODES)
def test_graphed_step_replays_the_eager_fixed_shape_step(mode):
    model, states, mask, tokens, latent = on_cuda(mode)
    with torch.no_grad():
        graphed = GraphedDecoder(model.decoder(model.encode_memory(states, mask), 8))
        eager = model.decoder(model.encode_memory(states, mask), 8)
        for t in range(6):
            torch.testing.assert_close(graphed.step(tokens[:, t], latent[:, t]).clone(), eager.step(tokens[:, t], latent[:, t]))


@pytest.mark.parametrize("mode", ["none", "all"])
def test_compiled_graphed_step_matches_the_eager_fixed_shape_step(mode):
    model, states, mask, tokens, latent = on_cuda(mode)
    with torch.no_grad():
        compiled = model.decoder(model.encode_memory(states, mask), 8, "compiled")
        assert isinstance(compiled, GraphedDecoder)
        eager = model.decoder(model.encode_memory(states, mask), 8)
        for t in range(6):
            torch.testing.assert_close(compiled.step(tokens[:, t], latent[:, t]).clone(),
                                       eager.step(tokens[:, t], latent[:, t]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_generation_with_graphs_writes_what_the_eager_step_writes(mode):
    model, states, mask, *_ = on_cuda(mode)
    mem = model.encode_memory(states, mask)
    n_latent = torch.tensor([0, 3, 1], device=CUDA)
    want = model.generate(mem, n_latent, BOS, -1, 6, decoder="static")
    assert model.generate(mem, n_latent, BOS, -1, 6, decoder="graphs") == want


@pytest.mark.parametrize("bptt_steps", [None, 2])
@pytest.mark.parametrize("mode", ["none", "last", "all"])
def test_graphed_training_matches_the_eager_path(mode, bptt_steps):
    model, states, mask, tokens, latent = on_cuda(mode)
    targets = torch.arange(tokens.numel(), device=CUDA).view(tokens.shape) % 40

    def grads(logits):
        model.zero_grad()
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = grads(model(tokens, latent, model.encode_memory(states, mask), bptt_steps))
    graphed = GraphedTraining(model, bptt_steps)
    for _ in range(2):  # capture, then replay
        got, got_grads = grads(graphed(tokens, latent, states, mask))
        assert not graphed.failed and len(graphed.graphs) == 1
        torch.testing.assert_close(got, want)
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode,passes", [("jacobi", 2), ("jacobi", 6), ("off", 1)])
def test_graphed_training_in_parallel_modes_matches_their_eager_forward(mode, passes):
    model, states, mask, tokens, latent = on_cuda("all")
    targets = torch.arange(tokens.numel(), device=CUDA).view(tokens.shape) % 40

    def grads(logits):
        model.zero_grad()
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def eager():  # nothing may keep this graph alive while the next one is captured
        mem = model.encode_memory(states, mask)
        return model.forward_off(tokens, latent, mem) if mode == "off" else model.forward_jacobi(tokens, latent, mem, passes)

    want, want_grads = grads(eager())
    graphed = GraphedTraining(model, None)
    for _ in range(2):  # capture, then replay
        got, got_grads = grads(graphed(tokens, latent, states, mask, mode, passes))
        assert not graphed.failed and len(graphed.graphs) == 1
        torch.testing.assert_close(got, want)
        assert got_grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, msg=lambda m: f"{name}: {m}")
    graphed(tokens, latent, states, mask, "sequential")  # a curriculum's switch of mode: one more graph
    assert len(graphed.graphs) == 2
