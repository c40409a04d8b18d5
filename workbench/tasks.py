"""Synthetic tasks with verifiable answers, deterministic from a seed.

For SFT (`Problem.conversation()`), RL with a verifiable reward (`Problem.prompt_messages()`
+ `Problem.reward(text)`) and exact-match evals. Small enough for the tiny built-in models
to learn on a CPU.

    task = get_task("recall")
    train, held_out = task.split(n_train=64, n_test=16, seed=0)   # disjoint questions
    train[0].conversation()  # [{"role": "user", ...}, {"role": "assistant", "content": answer}]
    held_out[0].check("...")  # exact match, surrounding whitespace ignored

Tasks: "arithmetic" (a+b=?), "reverse" (reverse a spaced letter string), "recall" (a fixed
key -> value table asked through several question templates; a held-out question asks a key
through a template the training split did not pair it with).
"""

from __future__ import annotations

import random
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from .renderers.base import Message

__all__ = ["ArithmeticTask", "Problem", "RecallTask", "ReverseTask", "Task", "get_task", "task_names"]


@dataclass(frozen=True)
class Problem:
    """One question with its single correct answer."""

    question: str
    answer: str
    system: Optional[str] = None

    def prompt_messages(self) -> list[Message]:
        """The conversation up to the model's turn (feed to build_generation_prompt)."""
        head = [Message(role="system", content=self.system)] if self.system else []
        return head + [Message(role="user", content=self.question)]

    def conversation(self) -> list[Message]:
        """The prompt plus the correct assistant answer (a supervised example)."""
        return self.prompt_messages() + [Message(role="assistant", content=self.answer)]

    def check(self, response: str) -> bool:
        """Exact match of the response text with the answer, outer whitespace ignored."""
        return response.strip() == self.answer

    def reward(self, response: str) -> float:
        return 1.0 if self.check(response) else 0.0


class Task(ABC):
    """A generator of Problems. `generate(rng)` draws one; `split` draws disjoint sets."""

    name: str = ""

    @abstractmethod
    def generate(self, rng: random.Random) -> Problem:
        """One problem drawn with `rng` (the only source of randomness)."""

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """`n_train` and `n_test` problems with no question in both (nor twice in either).

        Raises ValueError when the task cannot produce that many distinct questions.
        """
        if n_train < 0 or n_test < 0:
            raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
        rng = random.Random(f"{self.name}:{seed}")
        wanted = n_train + n_test
        seen: dict[str, Problem] = {}
        attempts = 0
        while len(seen) < wanted:
            attempts += 1
            if attempts > 50 * wanted + 1000:
                raise ValueError(f"task {self.name!r} produced only {len(seen)} distinct questions; "
                                 f"asked for {wanted} (make the task larger or ask for fewer)")
            problem = self.generate(rng)
            seen.setdefault(problem.question, problem)
        problems = list(seen.values())  # draw order, itself random
        return problems[:n_train], problems[n_train:]


class ArithmeticTask(Task):
    """"a+b=?" with 0 <= a, b <= max_operand; the answer is the decimal sum."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 20):
        self.max_operand = max_operand

    def generate(self, rng: random.Random) -> Problem:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        return Problem(question=f"{a}+{b}=?", answer=str(a + b))


class ReverseTask(Task):
    """"Reverse: a c b" -> "b c a": letters from a small alphabet, separated by spaces."""

    name = "reverse"

    def __init__(self, min_len: int = 3, max_len: int = 5, alphabet: str = "abcdefgh"):
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet

    def generate(self, rng: random.Random) -> Problem:
        letters = [rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len))]
        return Problem(question="Reverse: " + " ".join(letters), answer=" ".join(reversed(letters)))


RECALL_TEMPLATES = (
    "What is the value of {key}?",
    "{key} maps to?",
    "Recall {key}.",
    "Key {key}: value?",
    "Tell me {key}.",
    "Look up {key}.",
)


class RecallTask(Task):
    """key -> value recall from a fixed table (built from `table_seed`).

    Keys are invented lowercase words, values small colour words. Each problem asks one key
    through one of RECALL_TEMPLATES, so a held-out question pairs a key with a template the
    training split (usually) used only for other keys: learnable by memorising the table.
    """

    name = "recall"
    VALUES = ("red", "blue", "green", "black", "white", "pink", "gold", "gray")

    def __init__(self, n_keys: int = 8, table_seed: int = 0, templates: tuple[str, ...] = RECALL_TEMPLATES):
        rng = random.Random(f"recall-table:{table_seed}")
        keys: list[str] = []
        while len(keys) < n_keys:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
            if word not in keys:
                keys.append(word)
        self.table = {k: rng.choice(self.VALUES) for k in keys}
        self.templates = templates

    def generate(self, rng: random.Random) -> Problem:
        key = rng.choice(sorted(self.table))
        template = rng.choice(self.templates)
        return Problem(question=template.format(key=key), answer=self.table[key])


_TASKS = {"arithmetic": ArithmeticTask, "reverse": ReverseTask, "recall": RecallTask}


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kwargs) -> Task:
    """The task called `name`, built with `kwargs` (e.g. get_task("arithmetic", max_operand=9))."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    return _TASKS[name](**kwargs)
