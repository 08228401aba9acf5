"""The scaling bench: one suite task trained at several reasoner widths, accuracy against size."""

from __future__ import annotations

import json

import pytest

from split_model.bench import bench_main, scaling, suite


def test_each_width_trains_the_tasks_config_with_only_d_model_changed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    seen = []

    def fit_and_score(argv):
        seen.append(argv)
        width = int(next(a for a in argv if a.startswith("--model.reasoner.d_model=")).split("=")[1])
        return {"accuracy": width / 512, "accuracy_oracle": width / 512, "fit_seconds": 1.0,
                "trainable_params": width * 1000, "memory_params": 22_000_000}

    monkeypatch.setattr(suite, "fit_and_score", fit_and_score)
    monkeypatch.setattr(scaling, "RUNS", tmp_path / "runs")
    result = bench_main(["scaling", "--tasks", "gym_aiw", "--widths", "256,64", "--out-dir", str(tmp_path)])
    assert list(result["by_width"]) == ["64", "256"]  # sorted, each once
    assert result["by_width"]["256"]["accuracy"] == 0.5 and result["by_width"]["64"]["trainable_params"] == 64_000
    for argv, width in zip(seen, (64, 256)):
        assert argv[:3] == ["fit", "--config", str(suite.ROOT / "configs" / "reasoning_gym.yaml")]
        assert "--data.task.init_args.dataset=aiw" in argv and f"--model.reasoner.d_model={width}" in argv
        assert f"--trainer.default_root_dir={tmp_path / 'runs' / f'gym_aiw-d{width}'}" in argv
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert json.loads((tmp_path / "scaling.json").read_text())["task"] == "gym_aiw"


@pytest.mark.parametrize("widths, message", [("64,x", "comma-separated integers"), ("66", "multiple of 4"),
                                             ("4", "at least 8")])
def test_bad_widths_are_refused_with_what_to_write(widths, message):
    with pytest.raises(SystemExit, match=message):
        scaling.widths(widths)


def test_an_unknown_task_is_refused_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "fit_and_score", lambda argv: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="scaling: one task of prosqa"):
        bench_main(["scaling", "--tasks", "gsm9k", "--out-dir", str(tmp_path)])
