"""Synthetic knowledge worlds: a corpus of one-fact documents and multi-hop questions over it.

The reasoner must look facts up in a retrieval store, because the question holds none:

    documents: "The friend of Tavor is Milen."  "The boss of Milen is Sora."  "Sora lives in Paris."
    question:  "Where does the boss of the friend of Tavor live?"
    steps:     the three documents above, in the order they are used
    answer:    "Paris"

A model trained on world 0 is evaluated on world 1 by swapping only the store: entity names of
different worlds never overlap (each made-up name belongs to exactly one world, fixed by a hash
of the name), while relations and the closed set of answer cities are shared by all worlds.
Steps are the documents' exact text, so a store maps each step to its document by lookup.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from split_model import files
from split_model.tasks.base import Example, Split, Task, check_split, require_examples

# The closed answer set, shared by all worlds. Each is one token in BERT's uncased WordPiece
# vocabulary (the MiniLM memory), so an answer is a single output token.
CITIES: tuple[str, ...] = ("Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Dublin")
N_WORLDS = 8  # worlds 0..7; the name grammar is split into this many disjoint parts
MAX_HOPS = 4  # a question has 1..MAX_HOPS lookups: MAX_HOPS - 1 relations, then the city

# Names are two syllables, onset + vowel + optional coda: "Ta"+"vor" -> "Tavor".
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s")
# Words of the templates: a name equal to one would make a question ambiguous.
_TEMPLATE_WORDS = frozenset({"where", "does", "the", "of", "is", "lives", "live", "in"})


_RELATION_FACT = re.compile(r"The (\w+) of (\w+) is (\w+)\.")
_CITY_FACT = re.compile(r"(\w+) lives in (\w+)\.")
# Why a search returned `fetched` where it should have returned `wanted` (see miss_kind).
MISS_KINDS = ("the previous hop's fact", "same person, other relation", "the person as the object",
              "same relation, a name at most 2 letters off", "same relation, another person", "other")


def parse_fact(text: str) -> tuple[str, str, str] | None:
    """(relation, subject, object) of a world document: ("boss", "Tavor", "Milen") for "The boss
    of Tavor is Milen.", ("lives in", "Milen", "Rome") for "Milen lives in Rome."; None for any
    other text."""
    if m := _RELATION_FACT.fullmatch(text):
        return m[1], m[2], m[3]
    if m := _CITY_FACT.fullmatch(text):
        return "lives in", m[1], m[2]
    return None


def _letters_off(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two short names."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def miss_kind(wanted: str, fetched: str, previous: str | None = None) -> str:
    """Which of MISS_KINDS a search's top chunk `fetched` is, when the hop needed the document
    `wanted` (hop h's fact about person P); `previous`: the fact the hop before used."""
    if fetched == previous:
        return MISS_KINDS[0]
    want, got = parse_fact(wanted), parse_fact(fetched)
    if want is None or got is None:
        return MISS_KINDS[5]
    if got[1] == want[1]:
        return MISS_KINDS[1]
    if got[2] == want[1]:
        return MISS_KINDS[2]
    if got[0] == want[0]:
        return MISS_KINDS[3] if _letters_off(got[1].lower(), want[1].lower()) <= 2 else MISS_KINDS[4]
    return MISS_KINDS[5]


def stable_rng(*key: object) -> random.Random:
    """A generator seeded from `key`, identical in every process (sha256, not the salted hash())."""
    digest = hashlib.sha256("/".join(map(str, ("world", *key))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def world_of_name(name: str) -> int:
    """The one world a name may appear in; depends on the name only, never on a seed."""
    return int.from_bytes(hashlib.sha256(name.lower().encode()).digest()[:8], "big") % N_WORLDS


@functools.lru_cache(maxsize=N_WORLDS)
def _grammar_names(world: int) -> tuple[str, ...]:
    """Every name the syllable grammar gives world `world`, sorted."""
    syllables = [o + v + c for o, v, c in itertools.product(_ONSETS, _VOWELS, _CODAS)]
    names = (a + b for a, b in itertools.product(syllables, repeat=2))
    return tuple(sorted(n.capitalize() for n in names if world_of_name(n) == world))


def name_pool(world: int, reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names world `world` may use: its part of the grammar, minus template words and any name
    containing a reserved word (a city or relation), so "Limas" can never hint at "Lima"."""
    banned = tuple(word.lower() for word in reserved)
    return tuple(n for n in _grammar_names(world)
                 if n.lower() not in _TEMPLATE_WORDS and not any(b in n.lower() for b in banned))


@dataclass(frozen=True)
class WorldConfig:
    """What a world is made of; equal configs give equal worlds."""

    world: int = 0  # which world, 0..N_WORLDS-1; different worlds have disjoint entity names
    n_entities: int = 500  # number of people in the world
    relations: tuple[str, ...] = ("boss", "friend", "neighbour")  # each person has one of each, another person
    cities: tuple[str, ...] = CITIES  # where people live: the answer set, keep it shared by all worlds
    seed: int = 0  # picks the names, the relation targets and the cities

    def __post_init__(self) -> None:
        if not 0 <= self.world < N_WORLDS:
            raise ValueError(f"world must be between 0 and {N_WORLDS - 1}, got {self.world}")
        if self.n_entities < 4:
            raise ValueError(f"n_entities must be >= 4, got {self.n_entities}")
        if not self.relations or len(set(self.relations)) != len(self.relations):
            raise ValueError(f"relations must be a non-empty list of distinct words, got {self.relations}")
        if not self.cities or len(set(self.cities)) != len(self.cities):
            raise ValueError(f"cities must be a non-empty list of distinct names, got {self.cities}")


class World:
    """One knowledge world: people, one target per (relation, person), one city per person."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        pool = name_pool(config.world, (*config.cities, *config.relations))
        if config.n_entities > len(pool):
            raise ValueError(f"world {config.world} has {len(pool)} names; n_entities={config.n_entities} is too many")
        rng = stable_rng("graph", config.world, config.seed)
        self.names: list[str] = rng.sample(pool, config.n_entities)
        n = len(self.names)
        # targets[relation][i]: index of person i's `relation`; never i itself.
        self.targets: dict[str, list[int]] = {}
        for relation in config.relations:
            draws = [rng.randrange(n - 1) for _ in range(n)]
            self.targets[relation] = [j + (j >= i) for i, j in enumerate(draws)]
        # Cities in equal shares (counts differ by at most one), at random places.
        order = rng.sample(range(n), n)
        self.city: list[str] = [config.cities[order[i] % len(config.cities)] for i in range(n)]

    def relation_fact(self, relation: str, person: int) -> str:
        return f"The {relation} of {self.names[person]} is {self.names[self.targets[relation][person]]}."

    def city_fact(self, person: int) -> str:
        return f"{self.names[person]} lives in {self.city[person]}."

    def documents(self) -> list[str]:
        """The corpus, one fact per document: per person, each relation then the city."""
        docs = []
        for person in range(len(self.names)):
            docs.extend(self.relation_fact(r, person) for r in self.config.relations)
            docs.append(self.city_fact(person))
        return docs

    def n_questions(self, hops: int) -> int:
        """Distinct questions with `hops` lookups: a start person times a chain of hops - 1 relations."""
        return len(self.names) * len(self.config.relations) ** (hops - 1)

    def question(self, start: int, chain: tuple[str, ...]) -> Example:
        """Where the person reached from `start` lives; `chain` is read as written, outermost first:
        ("boss", "friend") asks for the city of boss(friend(start))."""
        phrase = "".join(f"the {r} of " for r in chain) + self.names[start]
        steps, person = [], start
        for relation in reversed(chain):  # resolution runs from the inside out
            steps.append(self.relation_fact(relation, person))
            person = self.targets[relation][person]
        steps.append(self.city_fact(person))
        return Example(question=f"Where does {phrase} live?", steps=tuple(steps), answer=self.city[person])

    def all_questions(self, hops: int) -> list[tuple[int, tuple[str, ...]]]:
        """Every (start, chain) with `hops` lookups, in a fixed order."""
        chains = itertools.product(self.config.relations, repeat=hops - 1)
        return [(start, chain) for chain in chains for start in range(len(self.names))]


def per_hop_counts(n: int, hops: list[int]) -> dict[int, int]:
    """How many of `n` round-robin examples have each hop count (example i has hops[i % len])."""
    return {h: n // len(hops) + (i < n % len(hops)) for i, h in enumerate(hops)}


def round_robin(by_hop: dict[int, list[Example]], hops: list[int], n: int) -> list[Example]:
    """Interleave the per-hop lists: example i comes from hops[i % len(hops)]."""
    iters = {h: iter(by_hop[h]) for h in hops}
    return [next(iters[hops[i % len(hops)]]) for i in range(n)]


def chance_accuracy(examples: list[Example]) -> float:
    """Accuracy of always answering the most common answer (about 1/len(CITIES) here)."""
    if not examples:
        raise ValueError("chance_accuracy needs at least one example")
    return Counter(ex.answer for ex in examples).most_common(1)[0][1] / len(examples)


class KnowledgeWorld(Task):
    """Multi-hop "where does ... live?" questions about one world, answered from its corpus.

    Per hop count, the distinct questions are shuffled once: valid takes the first ones, test
    the next, and train draws from the rest (repeating questions only once all were used), so
    held-out questions never appear in train and valid does not change with n_train or n_test.

    A list of worlds pools them: their names are disjoint, so their corpora form one corpus
    without a clash, and each split takes an equal share of its questions from every world
    (example i from the (i mod W)-th world listed). Training on several worlds gives the
    reasoner more facts than it can learn by heart, so it has to learn to look them up.
    """

    name = "world"

    def __init__(
        self,
        world: int | list[int] = 0,
        n_entities: int = 500,
        hops: list[int] = [1, 2, 3, 4],  # copied below, so the shared default is never changed
        n_train: int = 20000,
        n_valid: int = 400,
        n_test: int = 400,
        seed: int = 0,
    ) -> None:
        """Build the world; each split checks, when first drawn, that the world holds enough questions.

        Args:
            world: which world, 0..7 (different worlds have disjoint entity names), or a list of
                distinct worlds to pool, each of n_entities people.
            n_entities: number of people per world; each hop count has n_entities * 3**(hops-1)
                questions per world.
            hops: hop counts to ask, each in 1..4 and listed once; splits cycle through them.
            n_train: number of train examples (questions repeat when the world has too few).
            n_valid: number of valid examples (distinct, none in train).
            n_test: number of test examples (distinct, none in train or valid).
            seed: picks the world (names, relations, cities) and the questions of each split.
        """
        hops = list(hops)
        if not hops or len(set(hops)) != len(hops) or not all(1 <= h <= MAX_HOPS for h in hops):
            raise ValueError(f"hops must list distinct hop counts between 1 and {MAX_HOPS}, got {hops}")
        for arg, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        ids = [world] if isinstance(world, int) else list(world)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"world must be one world or a list of distinct worlds, got {world}")
        self.worlds = [World(WorldConfig(world=w, n_entities=n_entities, seed=seed)) for w in ids]
        self.hops = hops
        self.counts: dict[Split, int] = {"train": n_train, "valid": n_valid, "test": n_test}
        self.seed = seed
        self._cache: dict[Split, list[Example]] = {}

    @property
    def label(self) -> str:
        return "world" + "+".join(str(w.config.world) for w in self.worlds)

    def documents(self) -> list[str]:
        """The corpus the retrieval store holds: each world's documents, in the order listed."""
        return [doc for world in self.worlds for doc in world.documents()]

    def _shares(self, split: Split) -> list[dict[Split, dict[int, int]]]:
        """Per world: how many questions of each hop count each split takes from it."""
        n = len(self.worlds)
        per_world = {s: per_hop_counts(count, list(range(n))) for s, count in self.counts.items()}
        return [{s: per_hop_counts(per_world[s][i], self.hops) for s in self.counts} for i in range(n)]

    @staticmethod
    def hops_of(example: Example) -> int:
        """How many lookups `example` needs (one step per document used)."""
        return len(example.steps)

    def normalize(self, text: str) -> str:
        """Case-insensitive: an uncased memory writes "paris" for "Paris"."""
        return super().normalize(text).lower()

    def examples(self, split: Split) -> list[Example]:
        split = check_split(split)
        if split not in self._cache:
            self._check_enough_questions(split)
            self._cache[split] = self._generate(split)
        source = f"generated {self.label} with n_{split}={self.counts[split]}"
        return require_examples(self._cache[split], self.name, split, source)

    def _check_enough_questions(self, split: Split) -> None:
        """Raise if `split` cannot be drawn. Checked per split, when it is first built, so that
        `documents()` and the splits that fit stay usable: valid needs its own questions, test
        those after valid's, and train at least one question left over by both."""
        for world, counts in zip(self.worlds, self._shares(split)):
            for h in self.hops:
                held_out = counts["valid"][h] + (counts["test"][h] if split != "valid" else 0)
                needed = held_out + (split == "train" and counts["train"][h] > 0)
                if needed > world.n_questions(h):
                    asked = "valid asks" if split == "valid" else "valid and test ask"
                    more = " and train needs at least one more" if split == "train" else ""
                    raise ValueError(
                        f"world {world.config.world} has {world.n_questions(h)} distinct {h}-hop questions "
                        f"(n_entities={len(world.names)}); {asked} for {held_out}{more}; "
                        f"lower n_valid or n_test, or raise n_entities"
                    )

    def _generate(self, split: Split) -> list[Example]:
        by_world = {i: self._generate_world(world, counts, split)
                    for i, (world, counts) in enumerate(zip(self.worlds, self._shares(split)))}
        return round_robin(by_world, list(by_world), self.counts[split])

    def _generate_world(self, world: World, counts: dict[Split, dict[int, int]], split: Split) -> list[Example]:
        """`split`'s questions from one world, `counts[split][h]` of each hop count h."""
        by_hop = {}
        for h in self.hops:
            shuffled = world.all_questions(h)
            stable_rng("questions", world.config.world, self.seed, h).shuffle(shuffled)
            n_valid, n_test = counts["valid"][h], counts["test"][h]
            if split == "valid":
                chosen = shuffled[:n_valid]
            elif split == "test":
                chosen = shuffled[n_valid:n_valid + n_test]
            else:
                chosen = self._draw(shuffled[n_valid + n_test:], counts["train"][h], world.config.world, h)
            by_hop[h] = [world.question(start, chain) for start, chain in chosen]
        return round_robin(by_hop, self.hops, sum(counts[split].values()))

    def _draw(self, pool: list, n: int, world: int, hops: int) -> list:
        """`n` items of `pool`: shuffled passes over it, so no item repeats before all were used."""
        rng = stable_rng("train", world, self.seed, hops)
        out: list = []
        while len(out) < n:
            out.extend(rng.sample(pool, len(pool)))
        return out[:n]


def write_world(out_dir: str | Path, world: int | list[int] = 0, n_entities: int = 500, n_valid: int = 400,
                seed: int = 0) -> tuple[Path, Path]:
    """Write a world's corpus (`corpus.txt`, one document per line) and its valid questions
    (`questions.jsonl`: question, steps, answer) into `out_dir`; returns both paths. A list of
    worlds writes their pooled corpus and questions (see KnowledgeWorld).

    The questions equal the valid split of any KnowledgeWorld with these arguments, whatever its
    n_train and n_test: valid is carved out first.
    """
    task = KnowledgeWorld(world=world, n_entities=n_entities, n_valid=n_valid, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = files.write_text(out / "corpus.txt", "".join(doc + "\n" for doc in task.documents()))
    lines = (json.dumps({"question": ex.question, "steps": list(ex.steps), "answer": ex.answer})
             for ex in task.examples("valid"))
    questions = files.write_text(out / "questions.jsonl", "".join(line + "\n" for line in lines))
    return corpus, questions
