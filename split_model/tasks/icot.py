"""Multi-digit multiplication in the Implicit-CoT line format.

Each line of a file is `INPUT||COT #### OUTPUT`, numbers written as
space-separated digits, least-significant digit first:

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + ... #### 5 5 6 0 8 2 0 1

The chain of thought is a sum of partial products (with running sums in
parentheses); each ` + `-separated term becomes one reasoning step. With
`steps_as="columns"` the steps are instead long multiplication done column by
column, one digit product a step (see `column_steps`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from split_model.tasks.base import Example, FileTask

IcotStepsAs = Literal["text", "columns"]


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


def _digits(number: str) -> list[int]:
    parts = number.split()
    if not parts or not all(len(p) == 1 and p.isdigit() for p in parts):
        raise ValueError(f"expected space-separated digits, got {number!r}")
    return [int(p) for p in parts]


def column_totals(question: str) -> list[list[int]]:
    """Long multiplication column by column, for "a0 a1 ... * b0 b1 ..." (least-significant
    digit first): per column k of the product, the running total after each digit product
    a_i * b_(k-i) (i ascending), the first one including the carry from column k-1 (its
    total // 10). The last column has no product: its one total is the carry out of the one
    before. The units digit of each column's last total is the product's digit k; there are
    len(a) + len(b) columns, as many as the product's digits in this format."""
    if question.count("*") != 1:
        raise ValueError(f"expected 'DIGITS * DIGITS', got {question!r}")
    a, b = map(_digits, question.split("*"))
    columns, carry = [], 0
    for k in range(len(a) + len(b)):
        total, column = carry, []
        for i in range(max(0, k - len(b) + 1), min(k, len(a) - 1) + 1):
            total += a[i] * b[k - i]
            column.append(total)
        columns.append(column or [total])
        carry = total // 10
    return columns


def column_steps(question: str) -> tuple[str, ...]:
    """The steps of `column_totals`, one per running total, each written as its tens and its
    units digit, "340 7" for 347 ("0 7" for 7): with `data.step_token: set` a latent step is
    labelled with those two tokens, so the whole total, carry included, is named at every step
    without a multi-digit token. No two totals share a set when the memory's tokenizer writes
    each multiple of ten as one token (MiniLM's does up to 780; the largest total in the 4x4
    and 5x5 training files is 312 and 383); one that splits numbers into digits (SmolLM2's)
    gives 37 and 73 the same set. 4 x 4 digits give 17 steps, 5 x 5 give 26."""
    return _written(column_totals(question))


def _written(columns: list[list[int]]) -> tuple[str, ...]:
    return tuple(f"{t - t % 10} {t % 10}" for column in columns for t in column)


class IcotMultiplication(FileTask):
    """N x N digit multiplication with a long-multiplication chain of thought."""

    name = "icot_multiplication"

    def __init__(
        self,
        train_path: str | None = None,
        valid_path: str | None = None,
        test_path: str | None = None,
        max_examples: int | None = None,
        steps_as: IcotStepsAs = "text",
    ) -> None:
        """Point each split at an ICoT file.

        Args:
            train_path: file with the train split.
            valid_path: file with the valid split.
            test_path: file with the test split.
            max_examples: keep only the first this many examples of each split (None: all).
            steps_as: the reasoning steps: "text", the file's partial products and running
                sums, one ` + `-separated term a step; or "columns", long multiplication
                column by column, one digit product a step, each named by the column's
                running total, carry included (see `column_steps`), which labels one latent
                step per product with `data.steps: latent` and `data.step_token: set`.
        """
        super().__init__(train_path, valid_path, test_path, max_examples)
        if steps_as not in ("text", "columns"):
            raise ValueError(f"steps_as must be text or columns, got {steps_as!r}")
        self.steps_as = steps_as

    def parse_file(self, path: Path) -> list[Example]:
        return read_icot_file(path, self._parse_line)

    def _parse_line(self, line: str) -> Example:
        ex = parse_icot_line(line)
        if self.steps_as == "text":
            return ex
        columns = column_totals(ex.question)
        product = [column[-1] % 10 for column in columns]
        if product != _digits(ex.answer):
            raise ValueError(f"the answer {ex.answer!r} is not the product, "
                             f"{' '.join(map(str, product))} (least-significant digit first)")
        return Example(ex.question, _written(columns), ex.answer)


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
