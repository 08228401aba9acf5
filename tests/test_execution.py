"""The `execution` switch of the training module: the fixed-shape path trains what the
dynamic reference trains, a fused optimizer comes with it, and the CUDA-graph wrapper pads
batches without changing any real row and falls back to the eager path where it cannot
capture (as on this CPU)."""

from __future__ import annotations

import pytest
import torch
from test_reasoner import make_reasoner, memory_inputs, step_inputs

from split_model.reasoner.graphs import GraphedTraining, pad_batch_shape
from split_model.training import collate


def loss_and_grads(tiny, execution: str, root):
    """Loss and gradients of the same batch from the same start."""
    torch.manual_seed(0)
    module = tiny.module(tiny.memory("llama"), feedback="all", execution=execution)
    dm = tiny.data(module, root)
    dm.setup("fit")
    batch = collate([dm.datasets["train"][i] for i in range(8)])
    loss, _, _ = module._forward(batch)
    loss.backward()
    return module, loss.item(), {n: p.grad.clone() for n, p in module.reasoner.named_parameters() if p.grad is not None}


def test_fixed_shape_training_step_equals_the_reference(tiny, tmp_path):
    ref, ref_loss, ref_grads = loss_and_grads(tiny, "dynamic", tmp_path)
    fast, loss, grads = loss_and_grads(tiny, "auto", tmp_path)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=lambda m: f"{name}: {m}")
    # The same gradients through the fused and the plain optimizer: the same step.
    for p, q in zip(fast.reasoner.parameters(), ref.reasoner.parameters()):
        p.grad = q.grad.clone()
    fused, plain = fast.build_optimizer(), ref.build_optimizer()
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    fused.step()
    plain.step()
    for (name, p), q in zip(fast.reasoner.named_parameters(), ref.reasoner.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


def test_unknown_execution_is_refused(tiny):
    with pytest.raises(ValueError, match=r"execution must be one of auto, compiled, static, dynamic; got 'fast'"):
        tiny.module(tiny.memory("llama"), execution="fast")


def test_unknown_matmul_precision_is_refused(tiny):
    with pytest.raises(ValueError, match=r"matmul_precision must be one of highest, high, medium; got 'tf32'"):
        tiny.module(tiny.memory("llama"), matmul_precision="tf32")


def test_matmul_precision_is_left_alone_on_cpu(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"), matmul_precision="medium")
    before = torch.get_float32_matmul_precision()
    tiny.trainer(tmp_path, max_steps=1).fit(module, tiny.data(module, tmp_path))
    assert torch.get_float32_matmul_precision() == before == "highest"


def padded_logits(model, rows, steps, slots):
    states, mask = memory_inputs()
    tokens, latent = step_inputs(t=6)
    tok, lat, st, mk = pad_batch_shape(tokens, latent, states, mask, rows, steps, slots)
    assert tok.shape == (rows, steps) and st.shape[:2] == (rows, slots)
    return model(tok, lat, model.encode_memory(st, mk))


@pytest.mark.parametrize("mode", ["none", "all"])
def test_padding_to_a_graph_shape_leaves_real_rows_unchanged(mode):
    model = make_reasoner(mode)
    states, mask = memory_inputs()
    tokens, latent = step_inputs(t=6)
    with torch.no_grad():
        want = model(tokens, latent, model.encode_memory(states, mask))
        got = padded_logits(model, rows=5, steps=8, slots=64)
    torch.testing.assert_close(got[:3, :6], want)
    assert torch.isfinite(got).all()  # padded rows too: nan there would poison the gradients


@pytest.mark.parametrize("passes", [1, 3])
def test_padding_to_a_graph_shape_leaves_real_rows_unchanged_in_jacobi_mode(passes):
    model = make_reasoner("all")
    states, mask = memory_inputs()
    tokens, latent = step_inputs(t=6)
    with torch.no_grad():
        want = model.forward_jacobi(tokens, latent, model.encode_memory(states, mask), passes)
        tok, lat, st, mk = pad_batch_shape(tokens, latent, states, mask, 5, 8, 64)
        got = model.forward_jacobi(tok, lat, model.encode_memory(st, mk), passes)
    torch.testing.assert_close(got[:3, :6], want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("mode,passes", [("jacobi", 2), ("off", 1)])
def test_graphed_training_falls_back_to_the_eager_forward_of_its_mode(monkeypatch, mode, passes):
    from split_model.reasoner import graphs

    monkeypatch.setattr(graphs, "_warned", set())
    model = make_reasoner("all")
    with torch.no_grad():  # an open gate, so that the modes differ
        model.feedback.gate.weight.copy_(torch.eye(model.cfg.d_model))
    states, mask = memory_inputs()
    tokens, latent = step_inputs(t=6)
    graphed = GraphedTraining(model, bptt_steps=None)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        got = graphed(tokens, latent, states, mask, mode, passes)
    mem = model.encode_memory(states, mask)
    want = model.forward_off(tokens, latent, mem) if mode == "off" else model.forward_jacobi(tokens, latent, mem, passes)
    torch.testing.assert_close(got, want)
    assert (got - model(tokens, latent, mem)).abs().max() > 1e-4  # not what the exact recurrence computes


def test_graphed_training_without_cuda_falls_back_to_the_eager_path(monkeypatch):
    from split_model.reasoner import graphs

    monkeypatch.setattr(graphs, "_warned", set())
    model = make_reasoner("all")
    states, mask = memory_inputs()
    tokens, latent = step_inputs(t=6)
    graphed = GraphedTraining(model, bptt_steps=None)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the training recurrence failed"):
        got = graphed(tokens, latent, states, mask)
    assert graphed.failed
    torch.testing.assert_close(got, model(tokens, latent, model.encode_memory(states, mask)))
    got.sum().backward()
    assert model.latent_input.grad is not None


def test_weight_decay_reaches_projection_weights_only(tiny):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    decayed = set(module.decayed_parameters())
    assert decayed == {
        "adapter.proj.weight", "feedback.proj.weight",
        *(f"blocks.{i}.{w}.weight" for i in range(2) for w in ("attn.qkv", "attn.out", "xattn.q", "xattn.kv",
                                                                  "xattn.out", "mlp.up", "mlp.down")),
    }
    opt = module.build_optimizer()
    by_id = {id(p): n for n, p in module.reasoner.named_parameters()}
    groups = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert groups[module.hparams.weight_decay] == decayed
    assert {"feedback.gate.weight", "position.proj.weight", "adapter.position.proj.weight", "latent_input"} <= groups[0.0]


def test_checkpoint_of_an_earlier_version_loads_its_latent_input(tiny):
    module = tiny.module(tiny.memory("llama"))
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    old = {("reasoner.latent" if k == "reasoner.latent_input" else k): v + 1 if k == "reasoner.latent_input" else v
           for k, v in sd.items()}
    module.load_state_dict(old)
    torch.testing.assert_close(module.reasoner.latent_input.detach(), sd["reasoner.latent_input"] + 1)
