"""Honest scoring: validation runs the model as it would run on a raw question. The latent
count and the token budget come from the train split (or the checkpoint), never from the
example's own labels; the gold-assisted variant is logged apart as accuracy_oracle."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from split_model.tasks import StateTracking
from split_model.training import TaskDataModule


class ChainsOfManyLengths(StateTracking):
    """The shell game cut to 1..3 labelled steps (row i keeps 1 + i % 3; most keep 1): gold
    latent counts differ from row to row, as ProsQA's chains do."""

    def examples(self, split):
        out = []
        for i, ex in enumerate(super().examples(split)):
            k = 1 if i % 4 else 1 + (i // 4) % 3
            out.append(replace(ex, steps=ex.steps[:k], answer=ex.steps[k - 1]))
        return out


@pytest.fixture
def varied(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = TaskDataModule(ChainsOfManyLengths(n_items=3, length=3, n_train=64, n_valid=16, n_test=16),
                        steps="latent", batch_size=16, cache_dir=str(tmp_path))
    dm.connect(module)
    return module, dm


def record_generation(module, monkeypatch) -> list[tuple[list[int], int]]:
    calls, real = [], module.reasoner.generate

    def spy(mem, n_latent, bos_id, eos_id, max_new_tokens, **kw):
        calls.append((n_latent.tolist(), max_new_tokens))
        return real(mem, n_latent, bos_id, eos_id, max_new_tokens, **kw)

    monkeypatch.setattr(module.reasoner, "generate", spy)
    return calls


def test_validation_uses_the_train_splits_count_and_budget_not_the_gold_labels(varied, tiny, tmp_path, monkeypatch):
    module, dm = varied
    dm.setup("fit")
    gold = dm.datasets["valid"].sequences
    assert len({s.n_latent for s in gold}) == 3  # the valid rows really differ
    fmt = module.formatter
    assert fmt.default_latent == 1 and fmt.from_train  # the most common count of the train split
    assert fmt.max_target == max(len(s.labels) - s.n_latent for s in dm.datasets["train"].sequences)
    calls = record_generation(module, monkeypatch)
    metrics = tiny.trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    honest, oracle = calls  # one batch: the honest run, then the oracle run (gold counts differ)
    assert honest == ([1] * 16, fmt.max_target + 2)
    assert oracle[0] == [s.n_latent for s in gold]
    assert {"val/accuracy", "val/accuracy_oracle"} <= set(metrics)


def test_when_gold_counts_equal_the_default_the_oracle_is_not_run_twice(tiny, tmp_path, monkeypatch):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = tiny.data(module, tmp_path)
    dm.setup("fit")  # the train split sets the default count
    calls = record_generation(module, monkeypatch)
    metrics = tiny.trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    assert len(calls) == 1 and calls[0][0] == [3] * 16  # every game has 3 swaps: default == gold
    assert metrics["val/accuracy_oracle"] == metrics["val/accuracy"]


def test_validating_a_checkpoint_without_the_train_split_takes_its_counts_from_the_checkpoint(varied, tiny, tmp_path,
                                                                                             monkeypatch):
    module, dm = varied
    trainer = tiny.trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(module, dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    spec = torch.load(ckpt, map_location="cpu", weights_only=False)["split_model"]["format"]
    assert spec["default_latent"] == 1 and spec["max_target"] == module.formatter.max_target

    fresh = tiny.module(tiny.memory("llama"), feedback="all")  # a new process: validate from the checkpoint
    dm2 = TaskDataModule(ChainsOfManyLengths(n_items=3, length=3, n_train=64, n_valid=16, n_test=16),
                         steps="latent", batch_size=16, cache_dir=str(tmp_path))
    dm2.connect(fresh)
    assert fresh.formatter.default_latent == 0 and fresh.formatter.max_target is None  # nothing known yet
    calls = record_generation(fresh, monkeypatch)
    tiny.trainer(tmp_path).validate(fresh, datamodule=dm2, ckpt_path=str(ckpt), verbose=False)
    assert "train" not in dm2.datasets
    assert calls[0] == ([1] * 16, spec["max_target"] + 2)


def test_a_test_run_writes_every_prediction_a_summary_and_a_table(tiny, tmp_path, capsys):
    import json

    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = tiny.data(module, tmp_path)
    trainer = tiny.trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, dm)
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    test = dm.task.examples("test")
    assert [r["question"] for r in rows] == [e.question for e in test]
    assert [r["target"] for r in rows] == [e.answer for e in test]
    assert all(r["correct"] == (r["prediction"] == r["target"]) and r["score"] == float(r["correct"]) for r in rows)
    assert all(r["latent_steps"] == 3 and 1 <= r["tokens_written"] <= module.formatter.max_target + 2 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["examples"] == len(test) == 16
    assert summary["exact_match"] == pytest.approx(sum(r["correct"] for r in rows) / 16, abs=1e-4)
    assert summary["exact_match"] == pytest.approx(metrics["test/accuracy"], abs=1e-4)
    assert summary["mean_reasoner_steps"] == pytest.approx(3 + sum(r["tokens_written"] for r in rows) / 16, abs=1e-3)
    out = capsys.readouterr().out
    assert "| task | split | examples | exact_match |" in out and f"| state_tracking | test | 16 | {summary['exact_match']} |" in out
