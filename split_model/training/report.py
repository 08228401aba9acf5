"""What `split-model test` leaves behind: every prediction, a summary, and a table.

During a test run the module hands each batch's answers to a `TestReport`; at the end it
writes `predictions.jsonl` (question, target, prediction, correct, score, latent steps and
tokens written) and `summary.json` into the run's log directory and prints a markdown table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from split_model import files
from split_model.tasks import Example, Task


class TestReport:
    def __init__(self, task: Task, split: str = "test"):
        self.task, self.split = task, split
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def add(self, examples: list[Example], predictions: list[str], latent_steps: list[int], written: list[int]) -> None:
        """One batch: each row's prediction, the latent steps it took and the tokens it wrote (eos included)."""
        norm = self.task.normalize
        for ex, pred, k, n in zip(examples, predictions, latent_steps, written):
            self.rows.append({"question": ex.question, "target": ex.answer, "prediction": pred,
                              "correct": norm(pred) == norm(ex.answer), "score": float(self.task.score(pred, ex)),
                              "latent_steps": int(k), "tokens_written": int(n)})

    def summary(self) -> dict:
        n = len(self.rows)
        mean = (lambda key: sum(r[key] for r in self.rows) / n) if n else (lambda key: float("nan"))
        return {
            "task": self.task.label, "split": self.split, "examples": n,
            "exact_match": round(mean("correct"), 4), "task_score": round(mean("score"), 4),
            "mean_latent_steps": round(mean("latent_steps"), 3),
            # every latent step and every written token is one step of the reasoner's recurrence
            "mean_reasoner_steps": round(mean("latent_steps") + mean("tokens_written"), 3),
            "seconds": round(time.perf_counter() - self.start, 1),
        }

    def write(self, directory: str | Path, rank: int = 0, world_size: int = 1) -> dict:
        """predictions.jsonl and summary.json in `directory` (one pair per rank when there are
        several: predictions.rankR.jsonl, summary.rankR.json), each written whole under a
        temporary name and renamed. Returns the summary."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{rank}" if world_size > 1 else ""
        summary = self.summary()
        files.write_text(directory / f"predictions{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        files.write_text(directory / f"summary{suffix}.json", json.dumps(summary, indent=1) + "\n")
        return summary


def markdown_table(summary: dict) -> str:
    keys = ("task", "split", "examples", "exact_match", "task_score", "mean_latent_steps", "mean_reasoner_steps", "seconds")
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      "| " + " | ".join(str(summary[k]) for k in keys) + " |"])

