"""Learned halting: the head starts at "continue", a row never stops before its first latent
step nor after its maximum, halted rows write what a shorter fixed count writes, and the
halting loss trains the head."""

from __future__ import annotations

import pytest
import torch
from test_reasoner import BOS, MEM_DIM, MEM_STATES, VOCAB, memory

from split_model.reasoner import Reasoner, ReasonerConfig

EOS = 39


def halting_reasoner(bias: float | None = None) -> Reasoner:
    torch.manual_seed(0)
    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, embed_rank=8, feedback="all", halting=True)
    model = Reasoner(cfg, vocab_size=VOCAB, memory_dim=MEM_DIM, num_states=MEM_STATES).eval()
    with torch.no_grad():
        model.feedback.gate.weight.normal_(std=0.3)  # an open gate: latent steps change the state
        if bias is not None:
            model.halt.bias.fill_(bias)
    return model


@pytest.mark.parametrize("decoder", ["static", "dynamic"])
def test_a_fresh_head_thinks_for_the_full_count(decoder):
    model = halting_reasoner()
    n = torch.tensor([3, 0, 5])
    with torch.no_grad():
        p = model.halt_probability(torch.randn(4, 32))
    assert (p < 0.05).all()
    model.generate(memory(model), n, BOS, EOS, 4, decoder=decoder)
    assert model.last_latent_steps.tolist() == [3, 0, 5]


@pytest.mark.parametrize("decoder", ["static", "dynamic"])
def test_halting_stops_after_the_first_latent_step_and_writes_what_one_step_writes(decoder):
    model = halting_reasoner(bias=10.0)  # halt probability ~1 everywhere
    n = torch.tensor([3, 0, 5])
    got = model.generate(memory(model), n, BOS, EOS, 4, decoder=decoder)
    assert model.last_latent_steps.tolist() == [1, 0, 1]  # at least one step, where the row has any
    with torch.no_grad():
        model.halt.bias.fill_(-10.0)  # never halts: a fixed count
    assert model.generate(memory(model), torch.tensor([1, 0, 1]), BOS, EOS, 4, decoder=decoder) == got
    model.generate(memory(model), n, BOS, EOS, 4, decoder=decoder)
    assert model.last_latent_steps.tolist() == [3, 0, 5]  # never beyond the maximum


def test_rows_halt_independently():
    model = halting_reasoner()
    mem = memory(model)
    with torch.no_grad():  # the halt logit follows one hidden unit: rows cross it at different steps
        model.halt.weight.zero_()
        model.halt.weight[0, 5] = 8.0
        model.halt.bias.fill_(0.0)
    model.generate(mem, torch.tensor([6, 6, 6]), BOS, EOS, 3, decoder="static")
    static = model.last_latent_steps.tolist()
    model.generate(mem, torch.tensor([6, 6, 6]), BOS, EOS, 3, decoder="dynamic")
    assert model.last_latent_steps.tolist() == static
    assert all(1 <= k <= 6 for k in static) and len(set(static)) > 1  # this memory makes them differ


def test_halt_threshold_is_validated():
    with pytest.raises(ValueError, match="halt_threshold must be strictly between 0 and 1"):
        ReasonerConfig(halting=True, halt_threshold=1.0)


def test_halting_loss_trains_the_head_and_validation_reports_steps_used(tiny, tmp_path):
    from lightning.pytorch.callbacks import Callback

    module = tiny.module(tiny.memory("llama"), feedback="all", halting=True)
    dm = tiny.data(module, tmp_path, steps="none", latent_steps=3, length=2)
    before = module.reasoner.halt.weight.detach().clone()
    seen = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["halt_loss"] = float(trainer.callback_metrics["train/halt_loss"])

    trainer = tiny.trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=4, callbacks=[Grab()])
    trainer.fit(module, dm)
    assert seen["halt_loss"] > 0 and torch.isfinite(torch.tensor(seen["halt_loss"]))
    assert not torch.equal(module.reasoner.halt.weight.detach(), before)
    used = float(trainer.callback_metrics["val/latent_steps_used"])
    assert 1.0 <= used <= 3.0
    assert "val/halt_loss" in trainer.callback_metrics
    # The loss itself is computed outside a trainer too (the step hooks log it, not _forward).
    batch = next(iter(dm.val_dataloader()))
    loss, _, _ = module._forward(batch)
    assert torch.isfinite(loss) and float(module.halt_loss) > 0
