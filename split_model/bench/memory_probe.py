"""Which layers of a memory backbone expose a fact, where a reasoner can read it.

A reasoner follows a chain ("Tom is a terpus. Every terpus is a brimpus. ...") by attending
into the memory's token states: one hop needs a state that holds both ends of a fact. For each
fact "Every A is a B." of ProsQA questions, this bench reads the backbone's states at four
tokens (A, "is", B, the full stop) at every layer, and fits linear probes (softmax regression)
that name A and B from one state. Held-out accuracy says how readable each end is there.

The questions are $SPLIT_MODEL_BENCHMARKS/prosqa/prosqa_valid.json (default ../shared/benchmarks,
as in the configs) when it exists, else generated ProsQA questions over 17 people and 38 concepts, like the
public files. Probes train on the first two thirds of the questions and are scored on the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from split_model.bench import log
from split_model.tasks.coconut_json import FACT

POSITIONS = ("a", "verb", "b", "stop")  # the fact's subject, "is", object and full stop
PROBE_STEPS = 300


def questions(n: int) -> tuple[list[str], str]:
    """Up to n ProsQA questions: the public valid file when present, else generated ones."""
    path = Path(os.environ.get("SPLIT_MODEL_BENCHMARKS", "../shared/benchmarks")) / "prosqa" / "prosqa_valid.json"
    if path.is_file():
        return [item["question"] for item in json.loads(path.read_text())][:n], str(path.resolve())
    from split_model.tasks.coconut_json import CONCEPT_NAMES, PERSON_NAMES, ProsQAGenConfig, generate_prosqa

    step = len(CONCEPT_NAMES) // 38
    config = ProsQAGenConfig(person_names=PERSON_NAMES[:17], concept_names=CONCEPT_NAMES[::step][:38])
    return [item["question"] for item in generate_prosqa(n, seed=0, config=config)], "generated (17 people, 38 concepts, seed 0)"


def fact_tokens(question: str, offsets: list[tuple[int, int]]) -> list[tuple[str, str, dict[str, int]]]:
    """(A, B, token index of each position) for every fact of a question; offsets are the
    tokenizer's character spans per token. A fact cut off by truncation is left out."""

    def token_at(char: int) -> int | None:
        return next((i for i, (start, end) in enumerate(offsets) if start <= char < end), None)

    out = []
    for m in FACT.finditer(question):
        at = {p: token_at(m.start(p)) for p in POSITIONS}
        if None not in at.values():
            out.append((m["a"], m["b"], at))
    return out


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int) -> float:
    """Held-out accuracy of a softmax regression from standardised states x to labels y."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
    x = (x - mu) / sd
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return round(float((probe(x[~train]).argmax(-1) == y[~train]).float().mean()), 3)


def run(args) -> dict:
    from split_model.memory import HFMemory

    torch.set_num_threads(1)
    n_layers = HFMemory(name=args.memory).layers[-1]  # the default reads the last layer: its index is the depth
    memory = HFMemory(name=args.memory, layers=list(range(n_layers + 1)))
    hf = memory.tokenizer.hf
    if not getattr(hf, "is_fast", False):
        raise SystemExit(f"memory-probe needs a fast tokenizer (character offsets per token); {args.memory}'s is not")
    texts, source = questions(40 if args.quick else 300)
    log(f"memory-probe: {args.memory}, layers 0..{n_layers}, {len(texts)} questions from {source}")
    states, ends, owner = [], [], []
    for q, text in enumerate(texts):
        enc = hf(text, return_offsets_mapping=True, return_tensors="pt", truncation=True, max_length=memory.max_length)
        offsets = [tuple(o) for o in enc.pop("offset_mapping")[0].tolist()]
        with torch.no_grad():
            s = memory.encode(enc["input_ids"], enc["attention_mask"]).states[0]  # (N, layers, D)
        for a, b, at in fact_tokens(text, offsets):
            states.append(torch.stack([s[at[p]] for p in POSITIONS]))  # (positions, layers, D)
            ends.append((a, b))
            owner.append(q)
    if not states:
        raise SystemExit("memory-probe: no facts found in the questions")
    names = {n: i for i, n in enumerate(sorted({n for pair in ends for n in pair}))}
    labels = torch.tensor([[names[a], names[b]] for a, b in ends])  # (facts, 2)
    x = torch.stack(states)  # (facts, positions, layers, D)
    train = torch.tensor(owner) < round(len(texts) * 2 / 3)
    steps = 60 if args.quick else PROBE_STEPS
    by_layer: dict[str, dict] = {}
    for layer in range(n_layers + 1):
        by_layer[str(layer)] = {
            p: {end: probe_accuracy(x[:, i, layer], labels[:, j], train, steps) for j, end in enumerate(("subject", "object"))}
            for i, p in enumerate(POSITIONS)}
        log(f"layer {layer}: " + ", ".join(f"{p} {v['subject']:.2f}/{v['object']:.2f}" for p, v in by_layer[str(layer)].items()))
    layer, position = max(((l, p) for l in by_layer for p in POSITIONS), key=lambda lp: min(by_layer[lp[0]][lp[1]].values()))
    chance = [round(float(torch.bincount(labels[~train, j]).max()) / int((~train).sum()), 3) for j in (0, 1)]
    return {
        "memory": args.memory, "source": source, "questions": len(texts), "facts": len(ends), "names": len(names),
        "held_out_facts": int((~train).sum()), "chance": {"subject": chance[0], "object": chance[1]},
        "positions": {"a": "the subject's first token", "verb": "'is'", "b": "the object's first token", "stop": "the full stop"},
        "by_layer": by_layer,
        "both_ends": {"layer": int(layer), "position": position, **by_layer[layer][position]},
        "reading": "held-out accuracy of linear probes naming the subject and the object of 'Every A is a B.' from one "
                   "token state; both_ends is the layer and token where the weaker of the two is best",
    }
