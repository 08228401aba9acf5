"""retrieval-hops' run folders: fresh by default, continued with --resume."""

from __future__ import annotations

import torch

import numpy as np

from split_model.bench.retrieval_hops import RecordingStore, _follow_hops, start_or_resume
from split_model.tasks.world import MISS_KINDS


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


class _Store:
    """Chunk texts by id, and searches that answer from a script."""

    def __init__(self, texts, answers):
        self.texts, self.answers = texts, iter(answers)

    def search(self, queries, k, exclude=None):
        ids = next(self.answers)
        return np.zeros(ids.shape, dtype=np.float32), ids

    def text(self, i):
        return self.texts[i]


def test_each_question_is_followed_hop_by_hop_up_to_its_first_miss():
    texts = ["The boss of Tavor is Milen.", "Milen lives in Rome.", "The boss of Tavon is Sora.",
             "The friend of Tavor is Kilu.", "Sora lives in Oslo."]
    # two rows, k = 2: row 0 finds both of its facts; row 1 finds hop 1, then fetches another
    # person's city fact first and misses hop 2 (its hop 3 is not counted: the chain is broken)
    searches = [np.array([[3, 0], [0, -1]]), np.array([[1, 2], [4, 2]]), np.array([[2, 2], [2, 2]])]
    store = RecordingStore(_Store(texts, searches))
    for _ in searches:
        store.search(None, 2)
    misses = {str(h): {"reached": 0, "found": 0, **{kind: 0 for kind in MISS_KINDS}} for h in (1, 2, 3)}
    _follow_hops(store, 0, (texts[0], texts[1]), misses)
    _follow_hops(store, 1, (texts[0], texts[1], texts[4]), misses)
    assert misses["1"]["reached"] == 2 and misses["1"]["found"] == 2
    assert misses["2"]["reached"] == 2 and misses["2"]["found"] == 1
    assert misses["2"]["same relation, another person"] == 1  # "Sora lives in Oslo." for Milen's city
    assert misses["3"]["reached"] == 0
    assert store.text(0) == texts[0]  # all else is the wrapped store's
