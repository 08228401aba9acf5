"""Multi-digit multiplication in the Implicit-CoT line format.

Each line of a file is `INPUT||COT #### OUTPUT`, numbers written as
space-separated digits, least-significant digit first:

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + ... #### 5 5 6 0 8 2 0 1

The chain of thought is a sum of partial products (with running sums in
parentheses); each ` + `-separated term becomes one reasoning step.
"""

from __future__ import annotations

import re
from pathlib import Path

from split_model.tasks.base import Example, FileTask


def parse_icot_line(line: str) -> Example:
    """Parse one `INPUT||COT #### OUTPUT` line; raise ValueError if it is malformed."""
    if "||" not in line or "####" not in line:
        raise ValueError("expected 'INPUT||COT #### OUTPUT'")
    question, rest = line.split("||", 1)
    cot, answer = rest.rsplit("####", 1)
    question, cot, answer = question.strip(), cot.strip(), answer.strip()
    if not question or not answer:
        raise ValueError("empty INPUT or OUTPUT")
    steps = tuple(step.strip() for step in cot.split(" + ")) if cot else ()
    return Example(question=question, steps=steps, answer=answer)


_CALC = re.compile(r"<<([^<>]*)>>")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_gsm8k_line(line: str) -> Example:
    """Parse one GSM8K line of the ICoT format, `QUESTION||COT #### ANSWER`. The chain is either
    calculations, `<<a*b=c>> <<c+d=e>>` (valid/test files; each is one step, written without
    the brackets), or sentences (train_no_aug.txt; each sentence is one step)."""
    ex = parse_icot_line(line)
    cot = " + ".join(ex.steps)  # parse_icot_line split on " + "; calculations and sentences may contain it
    calcs = _CALC.findall(cot)
    steps = calcs if calcs else _SENTENCE_END.split(cot)
    return Example(question=ex.question, steps=tuple(s.strip() for s in steps if s.strip()), answer=ex.answer)


def read_icot_file(path: Path, parse=parse_icot_line) -> list[Example]:
    """Parse every non-empty line of `path`.

    Lines are split on "\\n" only: str.splitlines() also breaks on Unicode line
    separators, which occur inside some questions of this format.
    """
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {lineno}: malformed ICoT line ({err}): {line[:80]!r}") from None
    return examples


class IcotMultiplication(FileTask):
    """N x N digit multiplication with a long-multiplication chain of thought."""

    name = "icot_multiplication"

    def parse_file(self, path: Path) -> list[Example]:
        return read_icot_file(path)


class GSM8K(FileTask):
    """Grade-school math word problems (GSM8K, the ICoT repository's files): one calculation or
    sentence per step, a number as the answer, compared as numbers (1,000 = 1000 = 1000.0)."""

    name = "gsm8k"

    def parse_file(self, path: Path) -> list[Example]:
        return read_icot_file(path, parse_gsm8k_line)

    def normalize(self, text: str) -> str:
        text = super().normalize(text).replace(",", "").removeprefix("$")
        try:
            value = float(text)
        except ValueError:
            return text
        return str(int(value)) if value.is_integer() else str(value)
