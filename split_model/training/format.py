"""How an example becomes the reasoner's step sequence.

The memory reads the question. The reasoner's sequence is
    [latent] * K, bos, target..., with labels shifted by one and eos last,
where a latent position takes no token (a "continuous thought") and the target is:
- steps="text": the reasoning steps written out, an answer marker, then the answer;
- steps="latent": one latent step per reasoning step, each labelled with that step
  (steps must be single tokens, e.g. the state after each move; with step_token="first",
  the first token of each step, e.g. of the node a hop reaches; with step_token="set", a set:
  the first token of each word of the step, e.g. every node reached so far, trained towards
  equal probability on each), then the answer; with
  fixed_steps=n every example gets n labelled latent steps, a shorter chain repeating its
  last step (it has arrived and stays), so a raw question needs no chain length;
- steps="none": the answer only (K = `latent_steps` unlabelled latent steps before it).
With steps="text", `replaced_steps` = s replaces the first s written steps by
s * `latent_per_step` unlabelled latent steps (Coconut's curriculum stage s; see Curriculum).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from split_model.memory.tokenizer import TextTokenizer
from split_model.tasks import Example

StepsMode = Literal["text", "latent", "none"]
# steps="latent": a step must be one token, or its first token labels it, or its words' first tokens (a set) do
StepToken = Literal["whole", "first", "set"]
IGNORE = -100  # label of positions that are not scored
ANSWER_MARKER = " ####"  # separates written steps from the answer


@dataclass
class Sequence:
    tokens: list[int]  # input id per position (ignored where latent)
    latent: list[bool]  # True: the position takes the latent vector instead of a token
    labels: list[int]  # target id per position, IGNORE where none
    answer: list[bool]  # True where the label belongs to the answer (or its eos)
    n_latent: int  # positions before bos
    label_sets: list[tuple[int, ...]] | None = None  # step_token="set": target ids per position (() where none)


class Formatter:
    def __init__(self, tokenizer: TextTokenizer, steps: StepsMode = "text", latent_steps: int = 0,
                 default_latent: int | None = None, replaced_steps: int = 0, latent_per_step: int = 1,
                 max_target: int | None = None, step_token: StepToken = "whole", fixed_steps: int | None = None):
        if steps not in ("text", "latent", "none"):
            raise ValueError(f"steps must be one of text, latent, none; got {steps!r}")
        if step_token not in ("whole", "first", "set"):
            raise ValueError(f"step_token must be whole, first or set, got {step_token!r}")
        if fixed_steps is not None and (steps != "latent" or fixed_steps < 1):
            raise ValueError(f"fixed_steps gives every example that many labelled latent steps: it needs "
                             f"steps='latent' and a count >= 1, got steps={steps!r}, fixed_steps={fixed_steps!r}")
        if latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {latent_steps}")
        if replaced_steps < 0 or latent_per_step < 1:
            raise ValueError(f"replaced_steps must be >= 0 and latent_per_step >= 1, got {replaced_steps}, {latent_per_step}")
        if replaced_steps and steps != "text":
            raise ValueError(f"replaced_steps replaces written steps: it needs steps='text', not {steps!r}")
        self.tok, self.steps, self.latent_steps = tokenizer, steps, latent_steps
        self.replaced_steps, self.latent_per_step = replaced_steps, latent_per_step
        self.step_token, self.fixed_steps = step_token, fixed_steps
        self._first_ids: dict[str, int | None] = {}  # step_token="set": word -> its first token id
        self.marker = tokenizer.encode(ANSWER_MARKER)
        # What evaluation and generation use for a raw question, where the gold chain is
        # unknown: the most common latent count and the longest target (written steps, answer,
        # eos) in the training data, set by the data module from the train split and kept in
        # checkpoints. Never the example's own labels.
        self.default_latent = latent_steps if default_latent is None else default_latent
        self.max_target = max_target
        self.from_train = False  # True once the data module has set both from a train split

    @property
    def spec(self) -> dict:
        return {"steps": self.steps, "latent_steps": self.latent_steps, "default_latent": self.default_latent,
                "replaced_steps": self.replaced_steps, "latent_per_step": self.latent_per_step,
                "max_target": self.max_target, "step_token": self.step_token,
                "fixed_steps": self.fixed_steps}

    def n_latent(self, example: Example) -> int:
        return self._unlabelled(example) + (self._labelled(example) if self.steps == "latent" else 0)

    def _labelled(self, example: Example) -> int:
        return len(example.steps) if self.fixed_steps is None else self.fixed_steps

    def _unlabelled(self, example: Example) -> int:
        """Latent steps with no label: the extra ones, and those replacing written steps."""
        return self.latent_steps + self._replaced(example) * self.latent_per_step

    def _replaced(self, example: Example) -> int:
        return min(self.replaced_steps, len(example.steps)) if self.steps == "text" else 0

    def encode(self, ex: Example) -> Sequence:
        answer = self.tok.encode(ex.answer)
        if self.steps == "text":
            kept = ex.steps[self._replaced(ex):]
            written = self.tok.encode(" ".join(kept)) + self.marker if kept else self.marker
        else:
            written = []
        sets = self.steps == "latent" and self.step_token == "set"
        labelled = self._step_tokens(ex) if self.steps == "latent" and not sets else []
        step_sets = self._step_sets(ex) if sets else []
        step_labels = [IGNORE] * (self._unlabelled(ex) + len(step_sets)) + labelled
        k = len(step_labels)
        target = written + answer + [self.tok.eos_id]
        return Sequence(
            tokens=[self.tok.pad_id] * k + [self.tok.bos_id] + written + answer,
            latent=[True] * k + [False] * len(target),
            labels=step_labels + target,
            answer=[False] * (k + len(written)) + [True] * (len(answer) + 1),
            n_latent=k,
            label_sets=[()] * self._unlabelled(ex) + step_sets + [()] * len(target) if sets else None,
        )

    def _chain(self, ex: Example) -> list[str]:
        """The labelled steps: the example's, a shorter chain's last repeated up to fixed_steps."""
        if self.fixed_steps is not None and not 1 <= len(ex.steps) <= self.fixed_steps:
            raise ValueError(f"fixed_steps={self.fixed_steps} labelled latent steps, but an example has "
                             f"{len(ex.steps)} reasoning steps: raise data.fixed_steps to at least the longest chain")
        steps = list(ex.steps)
        return steps + steps[-1:] * (self._labelled(ex) - len(steps))

    def _step_sets(self, ex: Example) -> list[tuple[int, ...]]:
        """step_token="set": per labelled step, the first token of each of its words as the
        tokenizer writes the word after a space (the token the answer would use), sorted."""
        out = []
        for step in self._chain(ex):
            ids = {i for i in map(self._first_id, step.split()) if i is not None}
            if not ids:
                raise ValueError(f"step_token='set' labels a latent step with its words' tokens, but step {step!r} has none")
            out.append(tuple(sorted(ids)))
        return out

    def _first_id(self, word: str) -> int | None:
        """The first token of `word` written after a space (None if it has none); remembered per
        word, since a task's sets draw on few names and a split is encoded again on every reformat."""
        if word not in self._first_ids:
            space = self.tok.encode(" ")
            ids = self.tok.encode(" " + word)
            if space and ids[: len(space)] == space and len(ids) > len(space):
                ids = ids[len(space):]  # a tokenizer that writes the space as its own token
            self._first_ids[word] = ids[0] if ids else None
        return self._first_ids[word]

    def _step_tokens(self, ex: Example) -> list[int]:
        ids = [self.tok.encode(s) for s in self._chain(ex)]  # fixed_steps: a chain that has arrived stays
        empty = [s for s, i in zip(ex.steps, ids) if not i]
        if empty:
            raise ValueError(f"steps='latent' labels each latent step with a token, but step {empty[0]!r} has none")
        if self.step_token == "first":
            return [i[0] for i in ids]
        bad = [s for s, i in zip(ex.steps, ids) if len(i) != 1]
        if bad:
            raise ValueError(
                f"steps='latent' labels each latent step with one token, but step {bad[0]!r} is "
                f"{len(self.tok.encode(bad[0]))} tokens; use step_token='first' (data.step_token) to "
                "label it with its first token, or steps='text' or 'none' for this task"
            )
        return [i[0] for i in ids]

    def answer_from(self, ids: list[int]) -> str:
        """The answer part of generated ids: after the last answer marker in text mode."""
        if self.steps == "text":
            m = len(self.marker)
            hits = [i for i in range(len(ids) - m + 1) if ids[i : i + m] == self.marker]
            ids = ids[hits[-1] + m :] if hits else []
        return self.tok.decode(ids).strip()

    def canonical(self, ex: Example) -> Example:
        """The example with its answer as the tokenizer spells it back (e.g. lower-cased by BERT)."""
        return replace(ex, answer=self.tok.decode(self.tok.encode(ex.answer)).strip())
