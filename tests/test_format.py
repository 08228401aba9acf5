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


def test_latent_mode_labels_each_latent_step_with_its_step_token():
    one = Example(question="q", steps=("a", "b"), answer="7")
    seq = Formatter(TOK, steps="latent", latent_steps=1).encode(one)
    assert seq.n_latent == 3 and seq.latent[:3] == [True] * 3
    assert seq.labels == [IGNORE] + TOK.encode("a") + TOK.encode("b") + TOK.encode("7") + [TOK.eos_id]
    words = Example(question="q", steps=("brimpus", "wooden"), answer="7")
    with pytest.raises(ValueError, match="step 'brimpus' is 7 tokens; use step_token='first'"):
        Formatter(TOK, steps="latent").encode(words)
    seq = Formatter(TOK, steps="latent", step_token="first").encode(words)
    assert seq.n_latent == 2 and seq.labels[:2] == [TOK.encode("b")[0], TOK.encode("w")[0]]
    none = Formatter(TOK, steps="latent").encode(Example(question="q", steps=(), answer="7"))
    assert none.n_latent == 0 and none.labels == TOK.encode("7") + [TOK.eos_id]  # no steps: no labelled latent step
    assert Formatter(TOK, steps="latent", step_token="first").encode(one).labels == \
        Formatter(TOK, steps="latent").encode(one).labels  # one-token steps: the same either way


def test_fixed_steps_gives_every_chain_one_count_and_repeats_where_it_arrived():
    f = Formatter(TOK, steps="latent", fixed_steps=4)
    short = Example(question="q", steps=("a", "b"), answer="7")
    seq = f.encode(short)
    assert f.n_latent(short) == seq.n_latent == 4
    assert seq.labels[:4] == TOK.encode("a") + TOK.encode("b") * 3
    with pytest.raises(ValueError, match="an example has 5 reasoning steps: raise data.fixed_steps"):
        f.encode(Example(question="q", steps=tuple("abcde"), answer="7"))
    with pytest.raises(ValueError, match="needs steps='latent'"):
        Formatter(TOK, steps="none", fixed_steps=4)


def test_set_steps_label_each_latent_step_with_the_first_token_of_every_word():
    f = Formatter(TOK, steps="latent", step_token="set", fixed_steps=3, latent_steps=1)
    ex = Example(question="q", steps=("terpus dumpus", "terpus dumpus brimpus"), answer="Tom is a dumpus.")
    seq = f.encode(ex)
    t, d, b = (TOK.encode(w)[0] for w in ("t", "d", "b"))  # a word's first byte, not the space before it
    assert seq.n_latent == 4 and seq.latent == [True] * 4 + [False] * (len(ex.answer) + 1)
    # Set positions carry no single label; the extra unlabelled step and the answer carry no set.
    assert seq.labels == [IGNORE] * 4 + TOK.encode(ex.answer) + [TOK.eos_id]
    assert seq.label_sets == [(), tuple(sorted({t, d})), tuple(sorted({t, d, b})), tuple(sorted({t, d, b}))] + \
        [()] * (len(ex.answer) + 1)  # the chain's last set held to fixed_steps
    twice = f.encode(Example(question="q", steps=("tom terpus",), answer="x")).label_sets
    assert twice[1:4] == [(t,)] * 3  # words with one first token: one member
    assert Formatter(TOK, steps="latent").encode(Example("q", ("a",), "7")).label_sets is None  # no sets: nothing stored
    with pytest.raises(ValueError, match="step ' ' has none"):
        Formatter(TOK, steps="latent", step_token="set").encode(Example("q", (" ",), "7"))


@pytest.mark.parametrize("kwargs, message", [({"steps": "cot"}, "text, latent, none"), ({"latent_steps": -1}, ">= 0"),
                                             ({"step_token": "last"}, "whole, first or set")])
def test_bad_format_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Formatter(TOK, **kwargs)
