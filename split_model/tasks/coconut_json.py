"""ProsQA and ProntoQA in the Coconut JSON format, and a ProsQA-style generator.

Coconut stores a split as one JSON list; each item has `question` (str),
`steps` (list of str) and `answer` (str), and ProsQA items add the graph the
question was written from (`idx_to_symbol`, `edges`, `root`, `target`,
`neg_target`). Extra keys are ignored by the loader.

ProsQA has no public train split, so `ProsQA` generates one when no
`train_path` is given. The generator writes the same format: a random DAG over
made-up "-pus" concepts and a few people, stated as shuffled facts
("Every shumpus is a rempus.", "Tom is a terpus."), and a question whose answer
is the one option reachable from the person. The reasoning steps are a
shortest path from the person to the answer.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from split_model import files
from split_model.tasks.base import Example, FileTask, Split, require_examples

# ---------------------------------------------------------------------------
# Loading


def _item_to_example(item: Any) -> Example:
    """Validate one JSON item and turn it into an Example (ValueError on bad input)."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    missing = [key for key in ("question", "steps", "answer") if key not in item]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    question, steps, answer = item["question"], item["steps"], item["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("'question' and 'answer' must be strings")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError("'steps' must be a list of strings")
    return Example(question=question, steps=tuple(steps), answer=answer)


def read_coconut_items(path: Path) -> list[Any]:
    """The items of a Coconut JSON list file, as stored (ValueError naming the file otherwise)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(items).__name__}")
    return items


def read_coconut_json(path: Path) -> list[Example]:
    """Parse a Coconut JSON list file; errors name the file and the item index."""
    return _examples(read_coconut_items(path), str(path), lambda example, item: example)


def _examples(items: list[Any], source: str, view) -> list[Example]:
    """`view(example, item)` of every item; errors name `source` and the item index."""
    examples = []
    for index, item in enumerate(items):
        try:
            examples.append(view(_item_to_example(item), item))
        except ValueError as err:
            raise ValueError(f"{source}, item {index}: {err}") from None
    return examples


StepsAs = Literal["text", "nodes", "reached", "frontier", "backward"]
EvidencePart = Literal["fact", "class"]


def step_node(step: str) -> str:
    """The node a reasoning step arrives at: its last word, without the full stop.

    "Max is a vumpus. Each vumpus is a brimpus." -> "brimpus"; "Every terpus is a brimpus."
    -> "brimpus"; "Numpuses are not wooden." -> "wooden" (the polarity is dropped)."""
    words = step.replace(".", " ").split()
    if not words:
        raise ValueError(f"a reasoning step has no words: {step!r}")
    return words[-1]


def reached_steps(item: dict[str, Any], frontier: bool = False) -> tuple[str, ...]:
    """A breadth-first search from the root over ProsQA's graph, one step per hop from hop 0
    until nothing new is reached: after hop k, the names of every node within k edges of the
    root, the root included, in the order of `idx_to_symbol`, space-separated. Hop 0 is the
    root alone (the person the question asks about); the answer is in every step from its
    chain's length on; the other option is in none. Nothing in a step depends on which of the
    root's facts lies on the answer's path, which a hop read forward cannot know.

    Root Tom with facts Tom -> terpus, Tom -> dumpus, terpus -> brimpus: ("Tom", "Tom terpus
    dumpus", "Tom terpus dumpus brimpus") (names in index order).

    With `frontier`, step k names only the nodes first reached at hop k (exactly k edges from
    the root): ("Tom", "terpus dumpus", "brimpus"). A step then asks for the facts of the last
    step's nodes alone, and the answer is in exactly one step, the one of its distance."""
    mode = "frontier" if frontier else "reached"
    missing = [key for key in ("edges", "root", "idx_to_symbol") if key not in item]
    if missing:
        raise ValueError(f"steps_as='{mode}' needs ProsQA's graph, but the item has no {', '.join(missing)}")
    try:
        symbols = [str(s) for s in item["idx_to_symbol"]]
        dist = reachable([(int(a), int(b)) for a, b in item["edges"]], int(item["root"]))
        hops = max(dist.values())
        within = (lambda d, k: d == k) if frontier else (lambda d, k: d <= k)
        steps = tuple(" ".join(symbols[n] for n in sorted(dist) if within(dist[n], k)) for k in range(hops + 1))
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"steps_as='{mode}': the item's graph is malformed ({err})") from None
    if hops == 0:
        raise ValueError(f"steps_as='{mode}': the root has no fact in the item's graph")
    return steps


# A ProsQA fact as its questions state it: "Every terpus is a brimpus." or "Tom is a terpus."
# (subject a, verb, class b, full stop; "Each" as some generators write "Every").
FACT = re.compile(r"(?:(?:Every|Each) )?(?P<a>\w+) (?P<verb>is) an? (?P<b>\w+)(?P<stop>\.)")


def fact_spans(question: str, part: EvidencePart = "fact") -> dict[tuple[str, str], tuple[int, int]]:
    """Where a question states each "is a" fact: (subject, class) -> the character span of the
    sentence ("Every terpus is a brimpus." or "Tom is a terpus.", full stop included), or with
    part="class" of the class's name in it ("brimpus")."""
    return {(m["a"], m["b"]): m.span("b") if part == "class" else m.span() for m in FACT.finditer(question)}


def reached_evidence(item: dict[str, Any], question: str,
                     part: EvidencePart = "fact") -> tuple[tuple[tuple[int, int], ...], ...] | None:
    """What each step of `reached_steps` reads in the question: hop 0 nothing (the question
    names the root), hop k >= 1 every fact leaving a node first reached at hop k - 1 (the
    facts that search step follows), in the order of `edges`: the sentences, or with
    part="class" the names of the classes they state (the nodes the hop adds). The same for
    `frontier` steps. None when a fact of the graph is not stated in the question as "Every A
    is a B." or "A is a B." (the search's steps then carry no evidence)."""
    symbols = [str(s) for s in item["idx_to_symbol"]]
    edges = [(int(a), int(b)) for a, b in item["edges"]]
    dist = reachable(edges, int(item["root"]))
    spans = fact_spans(question, part)
    steps: list[tuple[tuple[int, int], ...]] = [()]
    for k in range(1, max(dist.values()) + 1):
        step = []
        for a, b in edges:
            if dist.get(a) == k - 1:
                span = spans.get((symbols[a], symbols[b]))
                if span is None:
                    return None
                step.append(span)
        steps.append(tuple(step))
    return tuple(steps)


def backward_steps(item: dict[str, Any]) -> tuple[str, ...]:
    """Backward chaining over a graph item, one step per hop from the goals back to the root.

    Step 0 names the goals (ProsQA: the two options, `target` and `neg_target`; a parsed
    ProntoQA question: the classes whose facts state the asked property, see
    `prontoqa_graph`). Step k names every node with an edge into step k-1's new nodes that no
    earlier step named, each with the goals it leads to, until a node is the root: that last
    step names the root and the goals it leads to (the proof's conclusion) and nothing else.
    A goal nothing leads to drops out, so the steps narrow to the chains that link the root to
    a goal, and every step says which goal its chains serve. Names are in the order of
    `idx_to_symbol`, space-separated.

    Root Tom with facts Tom -> terpus, terpus -> brimpus, Alex -> gorpus and options brimpus
    and gorpus: ("brimpus gorpus", "Alex terpus brimpus gorpus", "Tom brimpus")."""
    return _backward_chain(item)[0]


def _backward_chain(item: dict[str, Any]) -> tuple[tuple[str, ...], set[int]]:
    """`backward_steps` and the indices of the goals the root leads to."""
    missing = [key for key in ("edges", "root", "idx_to_symbol") if key not in item]
    if "goals" not in item and not ("target" in item and "neg_target" in item):
        missing.append("goals (or target and neg_target)")
    if missing:
        raise ValueError(f"steps_as='backward' needs a graph, but the item has no {', '.join(missing)}")
    try:
        symbols = [str(s) for s in item["idx_to_symbol"]]
        root = int(item["root"])
        goals = item["goals"] if "goals" in item else [item["target"], item["neg_target"]]
        parents: dict[int, set[int]] = {}
        for a, b in item["edges"]:
            parents.setdefault(int(b), set()).add(int(a))
        leads_to = {int(g): {int(g)} for g in goals}  # the new nodes of the last step -> their goals
        steps: list[str] = []
        seen: set[int] = set()
        while leads_to:
            if root in leads_to:
                return (*steps, " ".join(symbols[n] for n in sorted({root} | leads_to[root]))), leads_to[root]
            served = set().union(*leads_to.values())
            steps.append(" ".join(symbols[n] for n in sorted(set(leads_to) | served)))
            seen |= set(leads_to)
            new: dict[int, set[int]] = {}
            for node, node_goals in leads_to.items():
                for parent in parents.get(node, ()):
                    if parent not in seen:
                        new.setdefault(parent, set()).update(node_goals)
            leads_to = new
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"steps_as='backward': the item's graph is malformed ({err})") from None
    raise ValueError("steps_as='backward': no chain of facts leads from the root to a goal")


_PRONTO_QUERY = re.compile(r"True or false: (\w+) is (not )?(\w+)")
_PRONTO_FACTS = (
    re.compile(r"(?:Every|Each) (?P<subject>\w+) is (?P<neg>not )?(?P<article>an? )?(?P<object>\w+)"),
    re.compile(r"(?P<plural>\w+) are (?P<neg>not )?(?P<object>\w+)"),
    re.compile(r"(?P<subject>\w+) is (?P<neg>not )?(?P<article>an? )?(?P<object>\w+)"),
)


def _singular(word: str) -> str:
    """A class name as one member: "Tumpuses" -> "tumpus", "mammals" -> "mammal"."""
    word = word.lower()
    if word.endswith("uses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith("us"):
        return word[:-1]
    return word


def prontoqa_graph(question: str) -> dict[str, Any]:
    """A ProntoQA question as a graph in ProsQA's item format, for `reached_steps` and
    `backward_steps`: `idx_to_symbol` names the person asked about (`root`, as written) and
    every class (one member, lower case: "tumpus"); `edges` are the "is a" facts ("Alex is a
    tumpus.", "Every tumpus is a gorpus.", "Tumpuses are gorpuses."); `goals` are the classes
    whose property facts name the asked property ("Brimpuses are happy." or "Every lorpus is
    not happy." for "True or false: Alex is happy."), either way round, with `goal_negated`
    (per goal: its fact says "not"), `property` ("happy"), `asked` ("Alex is happy") and
    `properties` (the property every property fact names, in order).
    A fact's object is a class when it has an article ("is a", "is an") or, after "are", is
    a plural (it ends in "s" but not in "us": "gorpuses", not "luminous"); otherwise it is a
    property. ValueError names a sentence that fits none of the forms."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    query = _PRONTO_QUERY.fullmatch(sentences[-1]) if sentences else None
    if query is None:
        raise ValueError("a ProntoQA question ends with 'True or false: NAME is [not] PROPERTY.', "
                         f"got {question[-80:]!r}")
    root, prop = query.group(1), query.group(3)
    symbols: list[str] = [root]
    index = {root: 0}
    edges: list[tuple[int, int]] = []
    goals: list[int] = []
    negated: list[bool] = []  # per goal: its fact says "not"
    properties: list[str] = []  # the object of every property fact, in order

    def node(name: str) -> int:
        if name not in index:
            index[name] = len(symbols)
            symbols.append(name)
        return index[name]

    for sentence in sentences[:-1]:
        fact = next((m for m in (f.fullmatch(sentence) for f in _PRONTO_FACTS) if m), None)
        if fact is None:
            raise ValueError(f"a ProntoQA fact has none of the known forms: {sentence!r}")
        parts = fact.groupdict()
        if parts.get("plural"):
            subject = _singular(parts["plural"])
            is_class = _singular(parts["object"]) != parts["object"].lower()  # "luminous" is no plural
        else:
            subject, is_class = parts["subject"], bool(parts["article"])
            if sentence.startswith(("Every ", "Each ")):
                subject = subject.lower()
        if is_class:
            edges.append((node(subject), node(_singular(parts["object"]))))
        else:
            properties.append(parts["object"])
            if parts["object"] == prop:
                goals.append(node(subject))
                negated.append(bool(parts["neg"]))
    if not goals:
        raise ValueError(f"no fact of the ProntoQA question states the asked property {prop!r}")
    return {"idx_to_symbol": symbols, "edges": edges, "root": 0, "goals": goals, "goal_negated": negated,
            "property": prop, "asked": sentences[-1].removeprefix("True or false:").strip(), "properties": properties}


class CoconutJSON(FileTask):
    """Any benchmark stored as Coconut JSON lists, one file per split."""

    def __init__(
        self,
        train_path: str | None = None,
        valid_path: str | None = None,
        test_path: str | None = None,
        max_examples: int | None = None,
        steps_as: StepsAs = "text",
        evidence: EvidencePart = "fact",
    ) -> None:
        """Point each split at a Coconut JSON file.

        Args:
            train_path: JSON file with the train split.
            valid_path: JSON file with the valid split.
            test_path: JSON file with the test split.
            max_examples: keep only the first this many examples of each split (None: all).
            steps_as: what an example's reasoning steps are: "text", the written sentences;
                "nodes", the node each step arrives at ("brimpus"; see `step_node`), which
                labels one latent step per hop with `data.steps: latent` and
                `data.step_token: first`; "reached", every node within k hops of the root
                (the root included) after hop k = 0, 1, ..., until nothing new is reached
                (see `reached_steps`); "frontier", only the nodes first reached at hop k;
                or "backward", the nodes of a backward chaining from the goals to the root,
                one hop a step (see `backward_steps`). The last three need the item's graph
                (ProsQA items carry it; ProntoQA's is parsed from the question, see
                `prontoqa_graph`) and label each latent step with a set of nodes with
                `data.step_token: set`.
            evidence: with steps_as reached or frontier, what each search step names as the
                part of the question it reads (`Example.evidence`, taught by the model's
                `evidence_loss`): "fact", the sentences of the facts the hop follows, or
                "class", the names of the classes they state.
        """
        super().__init__(train_path, valid_path, test_path, max_examples)
        if steps_as not in ("text", "nodes", "reached", "frontier", "backward"):
            raise ValueError(f"steps_as must be text, nodes, reached, frontier or backward, got {steps_as!r}")
        if evidence not in ("fact", "class"):
            raise ValueError(f"evidence must be fact or class, got {evidence!r}")
        self.steps_as, self.evidence = steps_as, evidence

    def parse_file(self, path: Path) -> list[Example]:
        return _examples(read_coconut_items(path), str(path), self._steps_view)

    def _steps_view(self, example: Example, item: dict[str, Any]) -> Example:
        """The example with its steps as `steps_as` asks (`item`: its stored JSON object)."""
        if self.steps_as == "nodes":
            return Example(example.question, tuple(step_node(s) for s in example.steps), example.answer)
        if self.steps_as in ("reached", "frontier"):
            graph = self.graph(example, item)
            return Example(example.question, reached_steps(graph, self.steps_as == "frontier"), example.answer,
                           evidence=reached_evidence(graph, example.question, self.evidence))
        if self.steps_as == "backward":
            return Example(example.question, backward_steps(self.graph(example, item)), example.answer)
        return example

    def graph(self, example: Example, item: dict[str, Any]) -> dict[str, Any]:
        """The graph an item's question states, in ProsQA's item format (`edges`, `root`,
        `idx_to_symbol`): the stored item itself, which must carry it."""
        return item


class ProntoQA(CoconutJSON):
    """ProntoQA 5-hop true/false deduction over a fictional ontology."""

    name = "prontoqa"

    def graph(self, example: Example, item: dict[str, Any]) -> dict[str, Any]:
        """The question's facts as a graph (see `prontoqa_graph`): items carry no graph."""
        return prontoqa_graph(example.question)

    def _steps_view(self, example: Example, item: dict[str, Any]) -> Example:
        """As for every Coconut JSON task; with steps_as="backward", two more steps after the
        proof: the asked statement as the question puts it ("Alex is happy" for "True or false:
        Alex is happy."), then the proof's conclusion, the person and the property with the
        polarity of the reached goal's fact ("Alex is not happy" after "... Alex brimpus", when
        the facts say "Brimpuses are not happy."). The answer is True when the two agree: it
        compares two statements the reasoner has written in its own latent steps, where
        without them it is the XOR of two polarities read from the question, with no gradient
        towards either until the other is found."""
        if self.steps_as != "backward":
            return super()._steps_view(example, item)
        graph = self.graph(example, item)
        steps, reached = _backward_chain(graph)
        negated = {neg for goal, neg in zip(graph["goals"], graph["goal_negated"]) if goal in reached}
        if len(negated) != 1:  # the facts state the property of the person both ways
            raise ValueError(f"the ProntoQA question's facts prove both {graph['property']!r} and its negation")
        person = graph["idx_to_symbol"][graph["root"]]
        conclusion = f"{person} is {'not ' if negated.pop() else ''}{graph['property']}"
        return Example(example.question, (*steps, graph["asked"], conclusion), example.answer)


class ProsQA(CoconutJSON):
    """ProsQA graph reachability; the train split is generated when no file is given."""

    name = "prosqa"

    def __init__(
        self,
        train_path: str | None = None,
        valid_path: str | None = None,
        test_path: str | None = None,
        max_examples: int | None = None,
        n_generated: int = 10000,
        seed: int = 0,
        vocabulary_path: str | None = None,
        steps_as: StepsAs = "text",
        evidence: EvidencePart = "fact",
    ) -> None:
        """Point each split at a Coconut JSON file, or generate the train split.

        Args:
            train_path: JSON file with the train split; None generates it in-process.
            valid_path: JSON file with the valid split, e.g. .../prosqa/prosqa_valid.json.
            test_path: JSON file with the test split.
            max_examples: keep only the first this many examples of each split (None: all).
            n_generated: number of train examples to generate when train_path is None.
            seed: seed of the train generator when train_path is None.
            vocabulary_path: a ProsQA JSON file whose person and concept names the generator
                uses (e.g. the valid split: the public files share one small vocabulary);
                None: the built-in lists. See `prosqa_vocabulary`.
            steps_as: the reasoning steps as written ("text"), as the nodes they reach
                ("nodes"), as the nodes reached so far ("reached"), as the nodes first
                reached at each hop ("frontier") or as a backward chaining from the two
                options ("backward"), as for every Coconut JSON task.
            evidence: what each search step reads ("fact" or "class"), as for every Coconut JSON task.
        """
        super().__init__(train_path, valid_path, test_path, max_examples, steps_as, evidence)
        if n_generated < 1:
            raise ValueError(f"n_generated must be >= 1, got {n_generated}")
        self.n_generated = n_generated
        self.seed = seed
        self.vocabulary_path = vocabulary_path  # read when the train split is generated

    def _load_split(self, split: Split) -> list[Example]:
        if split != "train" or self.paths["train"] is not None:
            return super()._load_split(split)
        config = ProsQAGenConfig(**prosqa_vocabulary(self.vocabulary_path)) if self.vocabulary_path else None
        items = generate_prosqa(self.n_generated, seed=self.seed, config=config)
        source = f"generated with n_generated={self.n_generated}, seed={self.seed}, vocabulary_path={self.vocabulary_path}"
        examples = _examples(items, source, self._steps_view)[: self.max_examples]
        return require_examples(examples, self.name, split, source)


# ---------------------------------------------------------------------------
# Generating ProsQA-style items

PERSON_NAMES = (
    "Alex", "Bob", "Davis", "Fae", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Lena",
    "Max", "Nina", "Omar", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren",
)  # fmt: skip
# Concept names are onset + rime + "us" ("sh" + "ump" + "us" = "shumpus").
ONSETS = (
    "", "b", "bl", "br", "ch", "d", "f", "g", "gl", "gr", "gw", "h", "j", "k", "l",
    "m", "n", "r", "s", "sc", "scr", "sh", "sl", "st", "t", "tr", "v", "w", "y", "z", "zh",
)  # fmt: skip
RIMES = ("amp", "arp", "elp", "emp", "erp", "ilp", "imp", "irp", "olp", "omp", "orp", "ump", "urp", "oomp")
CONCEPT_NAMES = tuple(onset + rime + "us" for onset, rime in itertools.product(ONSETS, RIMES))


@dataclass(frozen=True)
class ProsQAGenConfig:
    """Shape of generated ProsQA graphs; defaults follow the public valid split."""

    min_nodes: int = 17  # fewest symbols (people + concepts) per item; real data: 17
    max_nodes: int = 28  # most symbols per item; real data: 28, median 23
    path_lengths: tuple[int, ...] = (3, 4, 5, 6)  # possible numbers of reasoning steps
    path_weights: tuple[float, ...] = (124, 133, 36, 7)  # how often each length occurs in real data
    edges_per_node: float = 1.6  # facts per symbol; real data median 1.57
    extra_person_prob: float = 0.4  # chance of each further distractor person; real: 40% have 3+
    person_fact_prob: float = 0.4  # chance a random extra fact about a person is kept (real: 2.9 facts about root)
    max_people: int = 6  # cap on people per item, including root and the second person
    # How many facts name each option as their class (its parents), as weights of 1, 2, 3, ...
    # parents: the answer has fewer than the other option in the real valid split (mean 1.5 vs
    # 2.1); drawn per item, so that the count of parents tells nothing the real data would not.
    target_parent_weights: tuple[float, ...] = (186, 84, 24, 6)
    neg_target_parent_weights: tuple[float, ...] = (100, 117, 55, 17, 8, 2, 1)
    max_tries: int = 1000  # graph resamples per item before giving up
    person_names: tuple[str, ...] = PERSON_NAMES  # names drawn for people (see prosqa_vocabulary)
    concept_names: tuple[str, ...] = CONCEPT_NAMES  # words drawn for concepts

    def __post_init__(self) -> None:
        if len(self.path_lengths) != len(self.path_weights) or not self.path_lengths:
            raise ValueError(
                f"path_lengths {self.path_lengths} and path_weights {self.path_weights} "
                "must be non-empty and of equal length"
            )
        if min(self.path_lengths) < 1:
            raise ValueError(f"path_lengths must be >= 1, got {self.path_lengths}")
        # Two people, the path's concepts, and neg_target with one parent concept.
        needed = max(self.path_lengths) + 4
        if not needed <= self.min_nodes <= self.max_nodes:
            raise ValueError(
                f"need {needed} <= min_nodes ({self.min_nodes}) <= max_nodes ({self.max_nodes}) "
                f"for paths of up to {max(self.path_lengths)} steps"
            )
        for name in ("target_parent_weights", "neg_target_parent_weights"):
            weights = getattr(self, name)
            if not weights or min(weights) < 0 or not sum(weights):
                raise ValueError(f"{name} must be non-negative weights of 1, 2, ... parents with a positive sum, "
                                 f"got {weights}")
        if self.max_nodes - 2 > len(self.concept_names) or not 2 <= self.max_people <= len(self.person_names):
            raise ValueError(
                f"max_nodes ({self.max_nodes}) or max_people ({self.max_people}) exceed the "
                f"{len(self.concept_names)} concept and {len(self.person_names)} person names available"
            )


def is_person(symbol: str) -> bool:
    """ProsQA's people are capitalised names ("Tom"); its concepts are lower-case words ("wumpus")."""
    return symbol[:1].isupper()


def prosqa_vocabulary(path: str | Path) -> dict[str, tuple[str, ...]]:
    """The names a ProsQA JSON file draws on, as ProsQAGenConfig arguments: `person_names`
    (capitalised symbols) and `concept_names` (the others), each sorted.

    The public ProsQA files use a small fixed vocabulary (17 people and 38 concept words; an
    item uses about 23 of the 55), while the built-in lists hold 20 people and 434 concept
    words: a reasoner trained on built-in names meets valid questions about people it never
    had to write. Only the names are read; no question, graph or answer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ProsQA vocabulary: no file at {path}")
    try:
        items = json.loads(path.read_text())
        symbols = {str(s) for item in items for s in item["idx_to_symbol"]}
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"ProsQA vocabulary: {path} is not a ProsQA JSON list with idx_to_symbol ({err})") from None
    people = tuple(sorted(s for s in symbols if is_person(s)))
    concepts = tuple(sorted(s for s in symbols if not is_person(s)))
    if len(people) < 2 or not concepts:
        raise ValueError(f"ProsQA vocabulary: {path} names {len(people)} people and {len(concepts)} concepts; "
                         "a generator needs at least 2 people and one concept")
    return {"person_names": people, "concept_names": concepts}


def reachable(edges: list[list[int]] | list[tuple[int, int]], start: int) -> dict[int, int]:
    """Shortest distance (in edges) from `start` to every node reachable from it."""
    children: dict[int, list[int]] = {}
    for src, dst in edges:
        children.setdefault(src, []).append(dst)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in children.get(node, ()):
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


class _GraphBuilder:
    """One candidate item: a DAG grown edge by edge under ProsQA's invariants.

    Nodes are numbered in topological order (every edge goes from a lower to a
    higher index), with the two main people at 0 and 1, as in the real data.
    Every edge added keeps three promises: `target` is reachable from `root` at
    distance exactly `n_steps` (so the chosen path stays a shortest one),
    `neg_target` is not reachable from `root`, and both options stay leaves.
    """

    def __init__(self, rng: random.Random, n_nodes: int, n_steps: int, people: list[int]) -> None:
        self.rng = rng
        self.n_nodes = n_nodes
        self.n_steps = n_steps
        self.people = people
        self.concepts = [i for i in range(n_nodes) if i not in set(people)]
        self.root = rng.choice([0, 1])
        self.path: list[int] = []  # concepts from root's first class to target, set by plant()
        self.target = -1  # the answer node, set by plant()
        self.neg_target = -1  # the unreachable option, set by plant()
        self.edges: list[tuple[int, int]] = []
        self.edge_set: set[tuple[int, int]] = set()
        self.dist: dict[int, int] = {self.root: 0}  # distances from root, kept current

    def plant(self) -> bool:
        """Lay the answer path from root and a distractor chain to neg_target."""
        self.path = sorted(self.rng.sample(self.concepts, self.n_steps))
        self.target = self.path[-1]
        off_path = [c for c in self.concepts if c not in set(self.path)]
        self.neg_target = self.rng.choice(off_path)
        below = [c for c in off_path if c < self.neg_target]
        chain_len = min(self.rng.randint(1, self.n_steps), len(below) + 1)
        chain = sorted(self.rng.sample(below, chain_len - 1)) + [self.neg_target]
        other = 1 - self.root
        for src, dst in itertools.pairwise([self.root, *self.path]):
            self.edges.append((src, dst))
        for src, dst in itertools.pairwise([other, *chain]):
            self.edges.append((src, dst))
        self.edge_set = set(self.edges)
        self.dist = reachable(self.edges, self.root)
        return self._valid(self.dist)

    def _valid(self, dist: dict[int, int]) -> bool:
        return dist.get(self.target) == self.n_steps and self.neg_target not in dist

    def try_add(self, src: int, dst: int) -> bool:
        """Add src -> dst if allowed and it keeps the invariants; report whether it did."""
        if src >= dst or dst in self.people or src in (self.target, self.neg_target):
            return False
        if (src, dst) in self.edge_set:
            return False
        if src in self.dist:  # only then can reachability from root change
            dist = reachable([*self.edges, (src, dst)], self.root)
            if not self._valid(dist):
                return False
            self.dist = dist
        self.edges.append((src, dst))
        self.edge_set.add((src, dst))
        return True

    def connect_all(self) -> bool:
        """Give every concept a parent and every person a child, so all are mentioned."""
        has_parent = {dst for _, dst in self.edges}
        for concept in self.concepts:
            if concept not in has_parent and not self._add_one([(u, concept) for u in range(concept)]):
                return False
        has_child = {src for src, _ in self.edges}
        for person in self.people:
            if person not in has_child and not self._add_one([(person, c) for c in self.concepts]):
                return False
        return True

    def _add_one(self, candidates: list[tuple[int, int]]) -> bool:
        """Add the first of `candidates` (in random order) that is allowed."""
        self.rng.shuffle(candidates)
        return any(self.try_add(src, dst) for src, dst in candidates)

    def add_random_edges(self, n_edges: int, person_fact_prob: float = 1.0,
                         max_parents: dict[int, int] | None = None) -> None:
        """Add random allowed edges until there are `n_edges` (or attempts run out); an edge
        from a person is kept with probability person_fact_prob (people sit at low indices, so
        uniform edges would state too many facts about them); a node of `max_parents` gets no
        parent beyond its count."""
        limits = max_parents or {}
        for _ in range(20 * n_edges):
            if len(self.edges) >= n_edges:
                return
            src, dst = sorted(self.rng.sample(range(self.n_nodes), 2))
            if src in self.people and self.rng.random() >= person_fact_prob:
                continue
            if dst in limits and self.parents(dst) >= limits[dst]:
                continue
            self.try_add(src, dst)

    def parents(self, node: int) -> int:
        return sum(dst == node for _, dst in self.edges)

    def add_parents(self, node: int, count: int) -> None:
        """Give `node` up to `count` parents in all, from the allowed edges into it."""
        candidates = [(src, node) for src in range(node)]
        self.rng.shuffle(candidates)
        for src, dst in candidates:
            if self.parents(node) >= count:
                return
            self.try_add(src, dst)


def _sample_people(rng: random.Random, n_nodes: int, cfg: ProsQAGenConfig) -> list[int]:
    """Node indices of the people: 0 and 1, plus distractors at random positions."""
    n_extra = 0
    while n_extra < cfg.max_people - 2 and rng.random() < cfg.extra_person_prob:
        n_extra += 1
    # Leave at least the path, neg_target and one chain node as concepts.
    n_extra = min(n_extra, n_nodes - 2 - max(cfg.path_lengths) - 2)
    return [0, 1, *sorted(rng.sample(range(2, n_nodes), n_extra))]


def _build_graph(rng: random.Random, cfg: ProsQAGenConfig) -> _GraphBuilder | None:
    """One attempt at a valid graph, or None if this draw cannot satisfy the invariants."""
    n_nodes = rng.randint(cfg.min_nodes, cfg.max_nodes)
    n_steps = rng.choices(cfg.path_lengths, weights=cfg.path_weights)[0]
    graph = _GraphBuilder(rng, n_nodes, n_steps, _sample_people(rng, n_nodes, cfg))
    if not graph.plant() or not graph.connect_all():
        return None
    parents = {graph.target: _draw_count(rng, cfg.target_parent_weights),
               graph.neg_target: _draw_count(rng, cfg.neg_target_parent_weights)}
    for node, count in parents.items():  # before the random edges, which may fill the rest
        graph.add_parents(node, count)
    graph.add_random_edges(round(cfg.edges_per_node * n_nodes), cfg.person_fact_prob, parents)
    return graph


def _draw_count(rng: random.Random, weights: tuple[float, ...]) -> int:
    """1, 2, ... with the given weights."""
    return rng.choices(range(1, len(weights) + 1), weights=weights)[0]


def _to_item(rng: random.Random, graph: _GraphBuilder, cfg: ProsQAGenConfig) -> dict[str, Any]:
    """Name the nodes and write the graph out as a ProsQA JSON item."""
    person_names = iter(rng.sample(cfg.person_names, len(graph.people)))
    concept_names = iter(rng.sample(cfg.concept_names, len(graph.concepts)))
    people = set(graph.people)
    symbols = [next(person_names) if i in people else next(concept_names) for i in range(graph.n_nodes)]

    def fact(src: int, dst: int) -> str:
        subject = symbols[src] if src in people else f"Every {symbols[src]}"
        return f"{subject} is a {symbols[dst]}."

    facts = [fact(src, dst) for src, dst in graph.edges]
    rng.shuffle(facts)
    options = [symbols[graph.target], symbols[graph.neg_target]]
    rng.shuffle(options)
    person = symbols[graph.root]
    question = " ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?"
    path = [graph.root, *graph.path]
    # Real files list edges grouped by destination, in no particular order within a group.
    edges = list(graph.edges)
    rng.shuffle(edges)
    edges.sort(key=lambda edge: edge[1])
    return {
        "question": question,
        "answer": f"{person} is a {symbols[graph.target]}.",
        "steps": [fact(src, dst) for src, dst in itertools.pairwise(path)],
        "idx_to_symbol": symbols,
        "edges": [[src, dst] for src, dst in edges],
        "root": graph.root,
        "target": graph.target,
        "neg_target": graph.neg_target,
    }


def generate_prosqa(n: int, seed: int = 0, config: ProsQAGenConfig | None = None) -> list[dict[str, Any]]:
    """Generate `n` ProsQA-format items, deterministically from `seed`.

    Every item satisfies the invariants of the real data: `target` is reachable
    from `root`, `neg_target` is not, both are leaves, and `steps` is a
    shortest path from `root` to `target`.
    """
    cfg = config or ProsQAGenConfig()
    rng = random.Random(seed)
    return [_generate_one(rng, cfg) for _ in range(n)]


def _generate_one(rng: random.Random, cfg: ProsQAGenConfig) -> dict[str, Any]:
    for _ in range(cfg.max_tries):
        graph = _build_graph(rng, cfg)
        if graph is not None:
            return _to_item(rng, graph, cfg)
    raise RuntimeError(f"no valid ProsQA graph in {cfg.max_tries} tries with {cfg}")


def prosqa_statistics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The shape of a set of ProsQA items (real or generated), to check one against the other:
    symbols, facts and people per item, facts about the asked person (the first branches a
    reasoner must choose between), question words, facts naming the answer and the other option
    as their class (means), the share of items whose answer has fewer such facts than the other
    option and the share where it has more (a count that differs between the options in one
    direction is a shortcut a model learns instead of the search), and the share of each path
    length."""
    if not items:
        raise ValueError("no ProsQA items to describe")
    n = len(items)

    def mean(values) -> float:
        return round(sum(values) / n, 2)

    def people(item) -> set[int]:
        return {i for i, s in enumerate(item["idx_to_symbol"]) if is_person(s)}

    steps = Counter(len(item["steps"]) for item in items)
    parents = [Counter(dst for _, dst in item["edges"]) for item in items]
    answer = [p[item["target"]] for p, item in zip(parents, items)]
    other = [p[item["neg_target"]] for p, item in zip(parents, items)]
    return {
        "items": n,
        "symbols": mean(len(item["idx_to_symbol"]) for item in items),
        "facts": mean(len(item["edges"]) for item in items),
        "people": mean(len(people(item)) for item in items),
        "facts_about_people": mean(sum(src in people(item) for src, _ in item["edges"]) for item in items),
        "facts_about_root": mean(sum(src == item["root"] for src, _ in item["edges"]) for item in items),
        "question_words": mean(len(item["question"].split()) for item in items),
        "answer_parents": mean(answer),
        "other_option_parents": mean(other),
        "answer_fewer_parents_share": round(sum(a < o for a, o in zip(answer, other)) / n, 3),
        "answer_more_parents_share": round(sum(a > o for a, o in zip(answer, other)) / n, 3),
        "path_length_share": {str(k): round(v / n, 3) for k, v in sorted(steps.items())},
        "distinct_names": len({s for item in items for s in item["idx_to_symbol"]}),  # in the whole set
    }


def _parsed_prontoqa(items: list[Any]) -> list[tuple[dict[str, Any], tuple[str, ...], set[int]]]:
    """Per item: its question's graph (`prontoqa_graph`), backward steps and the goals the
    person reaches (`_backward_chain`); ValueError names the item that cannot be read."""
    parsed = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"ProntoQA item {i}: expected an object with a 'question' string, got {str(item)[:80]!r}")
        try:
            graph = prontoqa_graph(item["question"])
            parsed.append((graph, *_backward_chain(graph)))
        except ValueError as err:
            raise ValueError(f"ProntoQA item {i}: {err}") from None
    return parsed


def prontoqa_statistics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The shape of a set of ProntoQA items, each parsed by `prontoqa_graph`: the share of each
    count of backward-chaining steps (`backward_steps`), the share of "True" answers, and
    `reached_goal_linked_share`: the share of items where the goal the person reaches is the
    only one of the two goals (the classes whose facts name the asked property) that any "is
    a" fact names. Where that share is 1, a model can pick the goal without
    following the chain: the other goal is named by its property fact alone."""
    if not items:
        raise ValueError("no ProntoQA items to describe")
    hops: Counter = Counter()
    linked_only = true = 0
    for item, (graph, steps, reached) in zip(items, _parsed_prontoqa(items)):
        named = {node for edge in graph["edges"] for node in edge}
        linked = {goal for goal in graph["goals"] if goal in named}
        linked_only += linked == set(reached) and len(graph["goals"]) > len(linked)
        hops[len(steps)] += 1
        true += str(item.get("answer", "")).strip().lower() == "true"
    n = len(items)
    return {"items": n, "true_share": round(true / n, 3),
            "backward_steps_share": {str(k): round(v / n, 3) for k, v in sorted(hops.items())},
            "reached_goal_linked_share": round(linked_only / n, 3)}


def prontoqa_without_link_cue(items: list[dict[str, Any]], seed: int = 0, chain: int = 3) -> list[dict[str, Any]]:
    """The items with the cue `prontoqa_statistics` measures taken away. The goal the person
    does not reach, where no "is a" fact names it, gets what the reached goal has: a chain of
    `chain` classes above it ("Every K1 is a K2.", ..., "Every Kc is a GOAL."), each with a
    property fact of its own ("Every K1 is not sour.", a property of the file other than the
    asked one), and two other classes of the question below it ("Every GOAL is a M.", fewer
    where the question has fewer that are no goal). The K are classes of the file's
    vocabulary that the question does not name (ProntoQA's questions name 14 of its 17), so
    no new word appears; every added sentence goes to a random place
    among the facts. Nothing the person reaches changes, so the proof and the answer stay
    (checked per item), but telling the two goals apart now takes following a chain from one
    end to the other: the top of the new chain has no parent, the reached chain's top is the
    person's class. Steps and answer are kept."""
    if chain < 1:
        raise ValueError(f"chain must be >= 1 class above the goal, got {chain}")
    rng = random.Random(seed)
    graphs = _parsed_prontoqa(items)
    vocabulary = sorted({name for graph, _, _ in graphs for name in graph["idx_to_symbol"][1:]})  # 0: the person
    properties = sorted({word for graph, _, _ in graphs for word in graph["properties"]})
    out = []
    for i, (item, (graph, _, reached)) in enumerate(zip(items, graphs)):
        names, goals = graph["idx_to_symbol"], graph["goals"]
        named = {node for edge in graph["edges"] for node in edge}
        sentences = [s.strip() for s in item["question"].split(".") if s.strip()]
        facts, query = sentences[:-1], sentences[-1]
        added: list[str] = []
        taken = set(names)  # classes a question already names, or this call has added to it
        for goal in (g for g in goals if g not in named):
            unused = [name for name in vocabulary if name not in taken]
            if len(unused) < chain:
                raise ValueError(f"ProntoQA item {i} leaves {len(unused)} classes of the file unnamed: too few for a "
                                 f"chain of {chain} above the goal {names[goal]!r}")
            ks = rng.sample(unused, chain)
            taken.update(ks)
            pool = [names[n] for n in range(1, len(names)) if n not in goals]
            below = rng.sample(pool, min(2, len(pool)))
            others = [word for word in properties if word != graph["property"]]
            if not others:
                raise ValueError(f"ProntoQA item {i}: the file states no property but {graph['property']!r}, so the "
                                 "added classes can have no property fact of their own")
            links = list(zip(ks, [*ks[1:], names[goal]])) + [(names[goal], m) for m in below]
            added += [f"Every {a} is {'an' if b[0] in 'aeiou' else 'a'} {b}" for a, b in links]
            added += [f"Every {k} is {rng.choice(['', 'not '])}{rng.choice(others)}" for k in ks]
        for sentence in added:
            facts.insert(rng.randrange(len(facts) + 1), sentence)
        question = ". ".join([*facts, query]) + "."
        new = prontoqa_graph(question)  # its nodes are numbered in order of mention: compare names
        if {new["idx_to_symbol"][n] for n in _backward_chain(new)[1]} != {names[n] for n in reached}:
            raise ValueError(f"ProntoQA item {i}: the added facts would change the proof")  # cannot happen
        out.append({**item, "question": question})
    return out


def write_prosqa(path: str | Path, n: int, seed: int = 0, config: ProsQAGenConfig | None = None) -> Path:
    """Generate `n` items and write them as one JSON list to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps(generate_prosqa(n, seed, config)))
    return path
