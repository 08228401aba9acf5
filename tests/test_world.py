"""Knowledge worlds: the corpus holds every fact a question needs and the question none, steps are
documents verbatim in resolution order, worlds never share a name, and splits never share a question."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from split_model.cli import dispatch
from split_model.tasks import CITIES, TASKS, Example, KnowledgeWorld, World, WorldConfig, chance_accuracy, get_task
from split_model.tasks.world import MISS_KINDS, N_WORLDS, miss_kind, name_pool, parse_fact

RELATIONS = ("boss", "friend", "neighbour")
SMALL = dict(n_entities=40, n_train=200, n_valid=40, n_test=40)

RELATION_FACT = re.compile(r"The (\w+) of (\w+) is (\w+)\.")
CITY_FACT = re.compile(r"(\w+) lives in (\w+)\.")
QUESTION = re.compile(r"Where does ((?:the \w+ of )*)(\w+) live\?")


def read_facts(documents: list[str]) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """(relation, person) -> person and person -> city, parsed back from the documents."""
    links, cities = {}, {}
    for doc in documents:
        if m := RELATION_FACT.fullmatch(doc):
            links[m[1], m[2]] = m[3]
        else:
            m = CITY_FACT.fullmatch(doc)
            assert m, doc
            cities[m[1]] = m[2]
    return links, cities


def resolve(question: str, links, cities) -> tuple[list[str], str]:
    """Follow the question's chain through the parsed facts: the documents used, and the city."""
    m = QUESTION.fullmatch(question)
    assert m, question
    chain = m[1].replace("the ", "").split(" of ")[:-1]  # outermost relation first
    person, used = m[2], []
    for relation in reversed(chain):
        target = links[relation, person]
        used.append(f"The {relation} of {person} is {target}.")
        person = target
    used.append(f"{person} lives in {cities[person]}.")
    return used, cities[person]


def test_same_arguments_give_the_same_world_and_questions_and_another_seed_does_not():
    a, b, c = KnowledgeWorld(**SMALL), KnowledgeWorld(**SMALL), KnowledgeWorld(**SMALL, seed=1)
    assert a.documents() == b.documents() != c.documents()
    for split in ("train", "valid", "test"):
        assert a.examples(split) == b.examples(split) != c.examples(split)


def test_worlds_never_share_a_name_whatever_their_seeds():
    names = {(w, s): set(World(WorldConfig(world=w, n_entities=200, seed=s)).names) for w in range(4) for s in (0, 1)}
    for (w, s), mine in names.items():
        for (v, t), theirs in names.items():
            if v != w:
                assert not mine & theirs, (w, s, v, t)
    pools = [set(name_pool(w)) for w in range(N_WORLDS)]
    assert sum(map(len, pools)) == len(set().union(*pools))


def test_names_are_unique_capitalised_and_never_a_city_or_relation():
    world = World(WorldConfig(n_entities=400))
    assert len(set(world.names)) == 400
    words = {w.lower() for w in (*CITIES, *RELATIONS)}
    for name in world.names:
        assert name[0].isupper() and name[1:].islower() and name.isalpha()
        assert not any(word in name.lower() for word in words), name


def test_every_person_has_every_relation_to_another_person_and_cities_are_balanced():
    world = World(WorldConfig(n_entities=50))
    links, cities = read_facts(world.documents())
    assert len(world.documents()) == 50 * 4 and len(set(world.documents())) == 200
    assert set(cities) == set(world.names) and set(cities.values()) == set(CITIES)
    for relation in RELATIONS:
        for person in world.names:
            assert links[relation, person] in cities and links[relation, person] != person
    assert set(Counter(cities.values()).values()) == {5}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_steps_are_documents_verbatim_and_follow_the_chain_to_the_answer(split):
    task = KnowledgeWorld(**SMALL)
    documents = task.documents()
    links, cities = read_facts(documents)
    corpus = set(documents)
    for ex in task.examples(split):
        assert all(step in corpus for step in ex.steps), ex
        steps, city = resolve(ex.question, links, cities)
        assert ex.steps == tuple(steps) and ex.answer == city and task.hops_of(ex) == len(steps)


def test_questions_hold_no_fact_and_no_city():
    task = KnowledgeWorld(**SMALL)
    for ex in task.examples("valid") + task.examples("train"):
        assert not any(doc in ex.question for doc in task.documents())
        assert not any(city.lower() in ex.question.lower() for city in CITIES), ex.question
    one_hop = [ex for ex in task.examples("valid") if task.hops_of(ex) == 1]
    assert one_hop[0].question.startswith("Where does ") and " the " not in one_hop[0].question


def test_splits_cycle_through_the_hop_counts():
    task = KnowledgeWorld(**SMALL, hops=[3, 1, 4])
    for split in ("train", "valid", "test"):
        hops = [task.hops_of(ex) for ex in task.examples(split)]
        assert hops == [[3, 1, 4][i % 3] for i in range(len(hops))]
    assert Counter(task.hops_of(ex) for ex in task.examples("valid")) == {3: 14, 1: 13, 4: 13}


def test_held_out_questions_are_distinct_and_never_in_train():
    task = KnowledgeWorld(**SMALL)
    train = {ex.question for ex in task.examples("train")}
    valid = [ex.question for ex in task.examples("valid")]
    test = [ex.question for ex in task.examples("test")]
    assert len(set(valid)) == len(valid) and len(set(test)) == len(test)
    assert not train & set(valid) and not train & set(test) and not set(valid) & set(test)
    # Valid does not move when train or test change size.
    assert KnowledgeWorld(**{**SMALL, "n_train": 7, "n_test": 3}).examples("valid") == task.examples("valid")


def test_train_repeats_a_question_only_after_using_every_other_one():
    task = KnowledgeWorld(n_entities=10, hops=[1], n_train=25, n_valid=2, n_test=3)
    counts = Counter(ex.question for ex in task.examples("train"))
    assert len(counts) == 5 and set(counts.values()) == {5}


@pytest.mark.parametrize("hops", [[0, 1], [1, 5], [], [2, 2]])
def test_hop_counts_outside_one_to_four_or_repeated_are_refused(hops):
    with pytest.raises(ValueError, match="hops must list distinct hop counts between 1 and 4"):
        KnowledgeWorld(hops=hops)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_train=0), "n_train must be >= 1, got 0"),
    (dict(n_valid=-1), "n_valid must be >= 1"),
    (dict(n_entities=3), "n_entities must be >= 4, got 3"),
    (dict(world=-1), "world must be between 0 and 7, got -1"),
    (dict(world=8), "world must be between 0 and 7, got 8"),
    (dict(n_entities=10**6), "world 0 has .* names; n_entities=1000000 is too many"),
])
def test_bad_arguments_are_refused_with_the_offending_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeWorld(**kwargs)


def test_asking_for_more_questions_than_the_world_holds_is_refused_when_the_split_is_drawn():
    task = KnowledgeWorld(n_entities=10, hops=[1, 2], n_valid=10, n_test=10)
    assert len(task.documents()) == 40 and len(task.examples("valid")) == 10 and len(task.examples("test")) == 10
    with pytest.raises(ValueError, match="world 0 has 10 distinct 1-hop questions .* ask for 10 and train needs"):
        task.examples("train")
    with pytest.raises(ValueError, match=r"has 10 distinct 1-hop questions \(n_entities=10\); valid and test ask for 12;"):
        KnowledgeWorld(n_entities=10, hops=[1, 2], n_valid=10, n_test=14).examples("test")
    with pytest.raises(ValueError, match="has 10 distinct 1-hop questions .*; valid asks for 11;"):
        KnowledgeWorld(n_entities=10, hops=[1, 2], n_valid=22).examples("valid")


def test_scoring_ignores_case_and_chance_is_about_one_in_ten():
    task = KnowledgeWorld()
    example = Example(question="q", steps=("x",), answer="Paris")
    assert task.score(" paris ", example) == 1.0 and task.score("Rome", example) == 0.0
    assert task.label == "world0" and KnowledgeWorld(**SMALL, world=3).label == "world3"
    for hops in (1, 2, 3, 4):
        share = chance_accuracy([ex for ex in task.examples("train") if task.hops_of(ex) == hops])
        assert share < 0.16, (hops, share)


def test_registered_as_world():
    assert TASKS["world"] is KnowledgeWorld
    assert get_task("world", **SMALL, world=2).label == "world2"


def test_data_world_writes_the_corpus_and_the_valid_questions(tmp_path, capsys):
    out = tmp_path / "world1"
    dispatch(["data", "world", "--world", "1", "--entities", "40", "-n", "20", "--seed", "2", "--out", str(out)])
    assert "wrote 160 documents" in capsys.readouterr().out
    task = KnowledgeWorld(world=1, n_entities=40, n_valid=20, seed=2)
    assert (out / "corpus.txt").read_text().splitlines() == task.documents()
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [Example(r["question"], tuple(r["steps"]), r["answer"]) for r in rows] == task.examples("valid")
    with pytest.raises(SystemExit):
        dispatch(["data", "prosqa", "--out", str(tmp_path / "p.json"), "--world", "1"])


def test_a_list_of_worlds_pools_their_corpora_and_shares_every_split_out_evenly():
    pooled = KnowledgeWorld(world=[0, 3], n_entities=40, n_train=90, n_valid=20, n_test=10, seed=1)
    alone = {w: KnowledgeWorld(world=w, n_entities=40, n_train=45, n_valid=10, n_test=5, seed=1) for w in (0, 3)}
    assert pooled.label == "world0+3" and KnowledgeWorld(world=[2], n_entities=40).label == "world2"
    assert pooled.documents() == alone[0].documents() + alone[3].documents()
    for split, n in (("train", 90), ("valid", 20), ("test", 10)):
        examples = pooled.examples(split)
        assert len(examples) == n
        # example i comes from the (i mod 2)-th world, and each world's share is what that world alone draws
        assert examples[0::2] == alone[0].examples(split) and examples[1::2] == alone[3].examples(split)
    held_out = {ex.question for split in ("valid", "test") for ex in pooled.examples(split)}
    assert not held_out & {ex.question for ex in pooled.examples("train")}
    corpus = set(pooled.documents())
    assert all(step in corpus for ex in pooled.examples("train") for step in ex.steps)


def test_one_world_in_a_list_is_that_world():
    for split in ("train", "valid", "test"):
        assert KnowledgeWorld(world=[2], **SMALL).examples(split) == KnowledgeWorld(world=2, **SMALL).examples(split)


@pytest.mark.parametrize("world, message", [([], "one world or a list of distinct worlds, got \\[\\]"),
                                            ([1, 1], "distinct worlds, got \\[1, 1\\]"),
                                            ([0, 9], "world must be between 0 and 7, got 9")])
def test_a_bad_list_of_worlds_is_refused(world, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeWorld(world=world, n_entities=40)


def test_a_pooled_world_too_small_for_its_share_names_the_world():
    with pytest.raises(ValueError, match="world 4 has 10 distinct 1-hop questions .*; valid asks for 11;"):
        KnowledgeWorld(world=[4, 5], n_entities=10, hops=[1, 2], n_valid=44).examples("valid")


def test_data_world_writes_a_pooled_corpus(tmp_path, capsys):
    out = tmp_path / "pooled"
    dispatch(["data", "world", "--world", "0", "2", "--entities", "40", "-n", "20", "--out", str(out)])
    assert "wrote 320 documents" in capsys.readouterr().out
    assert (out / "corpus.txt").read_text().splitlines() == KnowledgeWorld(world=[0, 2], n_entities=40).documents()


def test_a_missed_search_is_told_apart_by_what_it_returned_instead():
    world = World(WorldConfig(world=0, n_entities=40))
    boss, friend = world.targets["boss"], world.targets["friend"]
    p = next(i for i in range(40) if friend[i] != boss[i])
    wanted = world.relation_fact("boss", p)
    assert parse_fact(wanted) == ("boss", world.names[p], world.names[boss[p]])
    assert parse_fact(world.city_fact(p)) == ("lives in", world.names[p], world.city[p])
    assert parse_fact("Where does Tavor live?") is None
    before = "The friend of Sora is " + world.names[p] + "."
    assert miss_kind(wanted, before, previous=before) == "the previous hop's fact"
    assert miss_kind(wanted, world.relation_fact("friend", p)) == "same person, other relation"
    assert miss_kind(wanted, world.city_fact(p)) == "same person, other relation"
    assert miss_kind(wanted, before) == "the person as the object"
    near = world.names[p][:-1] + ("a" if world.names[p][-1] != "a" else "e")
    assert miss_kind(wanted, f"The boss of {near} is Kilu.") == "same relation, a name at most 2 letters off"
    assert miss_kind(wanted, "The boss of Zzzzzzzz is Kilu.") == "same relation, another person"
    assert miss_kind(wanted, "The neighbour of Zzzzzzzz is Kilu.") == "other"
    assert miss_kind(wanted, "") == "other"  # nothing fetched
    assert set(MISS_KINDS) >= {miss_kind(wanted, world.relation_fact("friend", q)) for q in range(40)}
