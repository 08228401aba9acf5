"""Training modes in the module and curricula: `off` is one parallel pass that leaves the
feedback untouched, stages switch modes, replace written steps by latent ones and sample
latent counts as configured (read back from the logged stage), and long recurrences train
without NaN or inf."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from split_model.tasks import Example
from split_model.training import Curriculum, Formatter, Stage, collate
from split_model.training.curriculum import resample_latent
from split_model.training.format import IGNORE


class Record(Callback):
    """What each training step ran: mode, batch width, n_latent, logged stage and metrics."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({"mode": pl_module.training_mode, "passes": pl_module.jacobi_passes,
                          "width": batch["tokens"].shape[1], "n_latent": batch["n_latent"].tolist(),
                          "stage": float(m["train/curriculum_stage"]) if "train/curriculum_stage" in m else None,
                          "loss": float(m["train/loss"]),
                          "depth": {k: float(v) for k, v in m.items() if k.startswith("train/grad_norm_depth_")}})


def test_off_mode_is_one_parallel_pass_and_leaves_the_feedback_untouched(tiny, tmp_path, monkeypatch):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    module.training_mode = "off"
    dm = tiny.data(module, tmp_path)
    dm.setup("fit")
    batch = collate([dm.datasets["train"][i] for i in range(8)])
    calls = []
    real_run = module.reasoner.run
    monkeypatch.setattr(module.reasoner, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    module.train()
    loss, _, _ = module._forward(batch)
    loss.backward()
    assert len(calls) == 1  # every position in one pass
    assert all(p.grad is None for p in module.reasoner.feedback.parameters())
    assert module.reasoner.embed.up.grad is not None


def test_unknown_training_mode_and_bad_passes_are_refused(tiny):
    memory = tiny.memory("llama")
    with pytest.raises(ValueError, match="training_mode must be one of sequential, jacobi, off; got 'parallel'"):
        tiny.module(memory, execution="auto").__class__(memory=memory, training_mode="parallel")
    with pytest.raises(ValueError, match="jacobi_passes must be at least 1"):
        tiny.module(memory).__class__(memory=memory, jacobi_passes=0)


def test_stages_are_validated():
    with pytest.raises(ValueError, match="mode must be one of"):
        Stage(start_step=3, mode="fast")
    with pytest.raises(ValueError, match=r"latent_steps must be a count >= 0 or \[low, high\]"):
        Stage(latent_steps=[4, 2])
    with pytest.raises(ValueError, match="increasing start_step"):
        Curriculum([{"start_step": 5}, {"start_step": 5}])
    with pytest.raises(ValueError, match="at least one stage"):
        Curriculum([])


def test_coconut_stage_replaces_the_first_written_steps_by_latent_steps(tiny):
    tok = tiny.memory("gpt2").tokenizer
    ex = Example(question="q", steps=("1", "2", "3"), answer="4")
    full = Formatter(tok, "text").encode(ex)
    stage2 = Formatter(tok, "text", replaced_steps=2, latent_per_step=2).encode(ex)
    assert full.n_latent == 0 and stage2.n_latent == 4
    assert stage2.latent[:4] == [True] * 4 and stage2.labels[:4] == [IGNORE] * 4
    written = stage2.labels[4:]
    assert tok.decode(written[: written.index(tok.eos_id)]) == tok.decode(tok.encode("3")) + " ####" + tok.decode(tok.encode("4"))
    everything = Formatter(tok, "text", replaced_steps=9, latent_per_step=1).encode(ex)
    assert everything.n_latent == 3  # at most as many as the example has
    with pytest.raises(ValueError, match="needs steps='text'"):
        Formatter(tok, "latent", replaced_steps=1)


def test_resampled_latent_count_keeps_every_later_position():
    batch = {"tokens": torch.tensor([[0, 0, 5, 6], [0, 0, 7, 8]]), "latent": torch.tensor([[1, 1, 0, 0]] * 2).bool(),
             "labels": torch.tensor([[IGNORE, IGNORE, 6, 9], [IGNORE, IGNORE, 8, 9]]),
             "answer_mask": torch.tensor([[0, 0, 1, 1]] * 2).bool(), "n_latent": torch.tensor([2, 2])}
    out = resample_latent(batch, 2, 3, pad_id=0)
    assert out["tokens"].tolist() == [[0, 0, 0, 5, 6], [0, 0, 0, 7, 8]]
    assert out["latent"][:, :3].all() and not out["latent"][:, 3:].any()
    assert out["labels"][:, 3:].tolist() == batch["labels"][:, 2:].tolist() and (out["labels"][:, :3] == IGNORE).all()
    assert out["n_latent"].tolist() == [3, 3]
    assert resample_latent(batch, 2, 0, pad_id=0)["tokens"].tolist() == [[5, 6], [7, 8]]
    sets = torch.full((2, 4, 2), IGNORE)
    sets[:, 2] = torch.tensor([4, 5])  # label sets (step_token="set") move with their positions
    out = resample_latent({**batch, "label_sets": sets}, 2, 3, pad_id=0)
    assert out["label_sets"].shape == (2, 5, 2) and torch.equal(out["label_sets"][:, 3:], sets[:, 2:])
    assert (out["label_sets"][:, :3] == IGNORE).all()


def test_curriculum_moves_through_its_stages(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = tiny.data(module, tmp_path, steps="none", latent_steps=2, length=2)
    curriculum = Curriculum([{"start_step": 0, "mode": "off"},
                             {"start_step": 2, "mode": "sequential"},
                             {"start_step": 4, "mode": "jacobi", "jacobi_passes": 3, "latent_steps": [0, 5]}], seed=1)
    record = Record()
    tiny.trainer(tmp_path, max_steps=8, callbacks=[curriculum, record]).fit(module, dm)
    rows = record.rows
    assert [r["stage"] for r in rows] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [r["mode"] for r in rows] == ["off"] * 2 + ["sequential"] * 2 + ["jacobi"] * 4
    assert rows[-1]["passes"] == 3
    assert all(r["n_latent"] == [2] * 16 for r in rows[:4])  # the configured count before the sampling stage
    sampled = [r["n_latent"][0] for r in rows[4:]]
    assert all(0 <= k <= 5 for k in sampled) and len(set(sampled)) > 1
    assert all(r["width"] - r["n_latent"][0] == rows[0]["width"] - 2 for r in rows)  # only the latent prefix changed
    # the stage is recomputed from the step: a new run with the same curriculum starts where asked
    assert curriculum.stage_at(3) == 1 and curriculum.settings_at(2)["mode"] == "jacobi"


def test_coconut_curriculum_reformats_the_training_data(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = tiny.data(module, tmp_path, steps="text", length=3)
    curriculum = Curriculum([{"start_step": 0}, {"start_step": 2, "replaced_steps": 1},
                             {"start_step": 4, "replaced_steps": 3}], latent_per_step=2)
    record = Record()
    tiny.trainer(tmp_path, max_steps=6, callbacks=[curriculum, record]).fit(module, dm)
    assert {s.n_latent for s in dm.datasets["train"].sequences} == {6}  # all 3 steps, 2 latent steps each
    assert module.formatter.spec["replaced_steps"] == 3 and module.formatter.spec["latent_per_step"] == 2
    n_latent = [r["n_latent"][0] for r in record.rows]
    assert n_latent[0] == 0 and 6 in n_latent  # the batches followed (a stage's first batch may be the old format)


@pytest.mark.parametrize("mode", ["sequential", "jacobi"])
def test_64_recurrent_steps_train_without_nan_or_inf(tiny, tmp_path, mode):
    module = tiny.module(tiny.memory("llama"), feedback="all", lr=1e-2)
    module.training_mode, module.jacobi_passes = mode, 4
    dm = tiny.data(module, tmp_path, steps="latent", length=64, n_train=32, batch_size=8)
    record = Record()
    tiny.trainer(tmp_path, max_steps=6, gradient_clip_val=1.0, log_every_n_steps=1, callbacks=[record]).fit(module, dm)
    assert all(math.isfinite(r["loss"]) for r in record.rows)
    assert all(torch.isfinite(p).all() for p in module.reasoner.parameters())
    depth = record.rows[-1]["depth"]
    assert len(depth) == math.ceil(record.rows[-1]["width"] / 4)  # one logged norm per window of 4 positions
    assert all(math.isfinite(v) and v > 0 for v in depth.values())
