"""`split-model bench faults`: every in-process scenario behaves as promised, and a scenario
whose promise is broken is reported as not ok (the bench can fail)."""

from __future__ import annotations

import json

import torch

from split_model.bench import bench_main, faults


def test_every_in_process_scenario_behaves(tmp_path, capsys):
    record = bench_main(["faults", "--quick", "--out-dir", str(tmp_path)])
    assert record["tried"] == len([s for s in faults.SCENARIOS if not s[3]]) >= 25
    broken = [s for s in record["scenarios"] if not s["ok"]]
    assert not broken, broken
    assert all(s["expected"] and s["observed"] for s in record["scenarios"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ok"] == record["ok"]


def test_a_broken_promise_is_reported_not_ok(tmp_path, monkeypatch):
    """Checkpoints saved in place (no temporary, no rename) fail the interrupted-save scenario."""
    from split_model.training import checkpoints

    def in_place(self, checkpoint, path, storage_options=None):
        torch.save(checkpoint, path)

    monkeypatch.setattr(checkpoints.AtomicCheckpointIO, "save_checkpoint", in_place)
    work = tmp_path / "w"
    work.mkdir()
    chosen = [s for s in faults.SCENARIOS if s[0] == "interrupted-checkpoint-save"]
    monkeypatch.setattr(faults, "SCENARIOS", chosen)
    record = faults.run(type("Args", (), {"quick": True})())
    assert record["tried"] == 1 and record["ok"] == 0
    assert "damaged" in record["scenarios"][0]["observed"]
