"""retrieval-hops' run folders: fresh by default, continued with --resume."""

from __future__ import annotations

import torch

from split_model.bench.retrieval_hops import start_or_resume


def test_a_fresh_run_empties_the_folder_and_a_resumed_one_continues_from_last_ckpt(tmp_path):
    root = tmp_path / "retrieval_all"
    (root / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3400}, root / "checkpoints" / "last.ckpt")
    (root / "fit.log").write_text("the first part\n")

    assert start_or_resume(root, resume=True) == ([f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}"], 3400)
    assert (root / "fit.log").read_text() == "the first part\n"  # nothing of the stopped run is lost

    assert start_or_resume(root, resume=False) == ([], 0)
    assert not root.exists()  # a fresh run cannot pick up another run's last.ckpt
    assert start_or_resume(root, resume=True) == ([], 0)  # nothing to resume: a fresh run
