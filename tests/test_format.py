"""How examples become step sequences, and how answers are read back from generated ids."""

from __future__ import annotations

import pytest

from split_model.memory import ByteTokenizer
from split_model.tasks import Example
from split_model.training.format import ANSWER_MARKER, IGNORE, Formatter

TOK = ByteTokenizer()
EX = Example(question="3 * 4", steps=("12", "+ 0"), answer="12")


def test_text_mode_writes_steps_then_marker_then_answer():
    seq = Formatter(TOK, steps="text", latent_steps=2).encode(EX)
    written = TOK.encode("12 + 0") + TOK.encode(ANSWER_MARKER)
    answer = TOK.encode("12")
    assert seq.n_latent == 2 and seq.latent == [True, True] + [False] * (len(written) + len(answer) + 1)
    assert seq.tokens == [TOK.pad_id] * 2 + [TOK.bos_id] + written + answer
    # labels are the inputs shifted by one, eos last; latent steps unlabelled here
    assert seq.labels == [IGNORE, IGNORE] + written + answer + [TOK.eos_id]
    assert seq.answer == [False] * (2 + len(written)) + [True] * (len(answer) + 1)


def test_none_mode_is_answer_only_after_unlabelled_latent_steps():
    seq = Formatter(TOK, steps="none", latent_steps=3).encode(EX)
    assert seq.tokens == [TOK.pad_id] * 3 + [TOK.bos_id] + TOK.encode("12")
    assert seq.labels == [IGNORE] * 3 + TOK.encode("12") + [TOK.eos_id]


def test_answer_is_read_after_the_last_marker_in_text_mode():
    f = Formatter(TOK, steps="text")
    ids = TOK.encode("1 2 ####  x #### 42")
    assert f.answer_from(ids) == "42"
    assert f.answer_from(TOK.encode("no marker at all")) == ""  # unfinished reasoning scores as wrong
    assert Formatter(TOK, steps="none").answer_from(TOK.encode(" 42 ")) == "42"


@pytest.mark.parametrize("kwargs, message", [({"steps": "cot"}, "text, latent, none"), ({"latent_steps": -1}, ">= 0")])
def test_bad_format_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Formatter(TOK, **kwargs)
