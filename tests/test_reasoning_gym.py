"""Tasks from reasoning-gym: seeded, disjoint splits and the generator's own scoring."""

from __future__ import annotations

import pytest

pytest.importorskip("reasoning_gym")

from split_model.tasks import ReasoningGym, get_task  # noqa: E402

SMALL = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def test_splits_are_seeded_and_held_out_splits_never_repeat_a_question():
    task = ReasoningGym("chain_sum", SMALL, n_train=300, n_valid=40, n_test=40)
    train, valid, test = (task.examples(s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (300, 40, 40)
    assert task.label == "reasoning_gym/chain_sum"
    questions = [{e.question for e in split} for split in (train, valid, test)]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    assert len(questions[1]) == 40  # distinct within a held-out split too
    again = get_task("reasoning_gym", dataset="chain_sum", config=SMALL, n_train=300, n_valid=40, n_test=40)
    assert again.examples("valid") == valid  # same seed, same questions, in another instance
    other = ReasoningGym("chain_sum", SMALL, n_train=300, n_valid=40, n_test=40, seed=1)
    assert other.examples("valid") != valid


def test_predictions_are_scored_by_the_generators_own_scorer():
    task = ReasoningGym("chain_sum", SMALL, n_train=10, n_valid=10, n_test=10)
    ex = task.examples("valid")[0]
    assert eval(ex.question.split(":")[1].rstrip("= ")) == int(ex.answer)  # the answer is the arithmetic's
    assert task.score(ex.answer, ex) == 1.0
    assert task.score(str(int(ex.answer) + 1), ex) == 0.0


def test_bad_names_configs_and_too_small_generators_are_refused():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'chain_sums'; known: .*chain_sum"):
        ReasoningGym("chain_sums")
    with pytest.raises(ValueError, match="bad config"):
        ReasoningGym("chain_sum", {"terms": 3}, n_train=5).examples("train")
    tiny = ReasoningGym("count_bits", {"min_n": 1, "max_n": 3}, n_train=5, n_valid=10, n_test=0, max_tries=5)
    with pytest.raises(ValueError, match="found only .* valid questions not in earlier splits"):
        tiny.examples("valid")


def test_held_out_splits_generate_without_a_train_split():
    task = ReasoningGym("chain_sum", SMALL, n_train=0, n_valid=5, n_test=5)
    assert len(task.examples("valid")) == 5 and len(task.examples("test")) == 5
    with pytest.raises(ValueError, match=r"split 'train' has no examples \(source: reasoning-gym chain_sum with n_train=0\)"):
        task.examples("train")
