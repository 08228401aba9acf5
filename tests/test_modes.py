"""Training modes: Jacobi passes converge to the exact recurrence (outputs and gradients),
`off` is one parallel pass without feedback, and the module's switch picks them."""

from __future__ import annotations

import pytest
import torch
from test_reasoner import MODES, make_reasoner, memory, step_inputs
from test_static import loss_and_grads


def jacobi(passes):
    def fn(model):
        return lambda tokens, latent, mem, bptt: model.forward_jacobi(tokens, latent, mem, passes, bptt)
    return fn


@pytest.mark.parametrize("output_vocab", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_jacobi_with_as_many_passes_as_steps_is_the_exact_recurrence(mode, output_vocab):
    model = make_reasoner(mode)
    if output_vocab:
        model.set_output_vocab(torch.tensor([3, 5, 7, 11, 39]))
    tokens, latent = step_inputs(t=7)
    want, want_grads = loss_and_grads(model, model.forward, tokens, latent)
    for passes in (7, 9):
        got, got_grads = loss_and_grads(model, jacobi(passes)(model), tokens, latent)
        torch.testing.assert_close(got, want)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["last", "all"])
def test_jacobi_pass_k_makes_the_first_k_positions_exact(mode):
    model = make_reasoner(mode)
    tokens, latent = step_inputs(t=7)
    with torch.no_grad():
        exact = model(tokens, latent, memory(model))
        for k in (1, 3, 5):
            got = model.forward_jacobi(tokens, latent, memory(model), k)
            torch.testing.assert_close(got[:, :k], exact[:, :k])
            assert (got[:, k:] - exact[:, k:]).abs().max() > 1e-4  # the rest is not yet converged


def test_jacobi_with_truncation_computes_the_same_outputs_and_cuts_the_feedback_gradient():
    model = make_reasoner("all")
    tokens, latent = step_inputs(t=7)
    exact, _ = loss_and_grads(model, model.forward, tokens, latent, 3)
    got, _ = loss_and_grads(model, jacobi(7)(model), tokens, latent, 3)
    torch.testing.assert_close(got, exact)
    # bptt_steps=1 detaches every feedback input: the feedback weights then learn only from how
    # each fed-back input changes its own step, not through the steps that produced it.
    loss_and_grads(model, jacobi(7)(model), tokens, latent, 1)
    one = model.feedback.proj.weight.grad.clone()
    loss_and_grads(model, jacobi(7)(model), tokens, latent, None)
    assert not torch.allclose(one, model.feedback.proj.weight.grad)


@pytest.mark.parametrize("mode", MODES)
def test_off_is_one_parallel_pass_without_feedback(mode):
    model = make_reasoner(mode)
    tokens, latent = step_inputs(t=7)
    with torch.no_grad():
        got = model.forward_off(tokens, latent, memory(model))
        none = make_reasoner("none")  # same seed: every weight but the feedback's is the same
        torch.testing.assert_close(got, none(tokens, latent, memory(none)))
        torch.testing.assert_close(model.forward_jacobi(tokens, latent, memory(model), 1), got)


def test_jacobi_refuses_zero_passes():
    model = make_reasoner("all")
    tokens, latent = step_inputs()
    with pytest.raises(ValueError, match="at least one pass"):
        model.forward_jacobi(tokens, latent, memory(model), 0)
