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
through a template the training split did not pair it with), "capitals" (the capitals of
invented countries, which no pretrained model can know; held-out questions ask the same
facts in phrasings the training split never uses; `known_split` adds real countries).
"""

from __future__ import annotations

import random
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from .renderers.base import Message

__all__ = [
    "ArithmeticTask", "CapitalsTask", "NamedAnswerProblem", "Problem", "RecallTask", "ReverseTask", "Task",
    "get_task", "task_names",
]


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


#: Invented countries and their invented capitals (none is a real place a model could know).
CAPITALS = (
    ("Veltoria", "Quorin"), ("Dravenmark", "Ostrelle"), ("Kelvoss", "Marundi"),
    ("Zembria", "Tolvik"), ("Orinthal", "Pellagard"), ("Skarrow", "Ninveth"),
    ("Halvania", "Brisko"), ("Quentaro", "Ulmsby"), ("Taravel", "Gorrund"),
    ("Mistovia", "Calvanth"), ("Brennoc", "Ishtevar"), ("Yulmark", "Dornell"),
)
#: Real countries, for `CapitalsTask.known_split`: the first 8 to mix into training, the last 8
#: (ones SmolLM2-135M-Instruct names correctly in every held-out phrasing) to check retention.
REAL_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"),
    ("Russia", "Moscow"), ("Ireland", "Dublin"), ("Iran", "Tehran"), ("Kenya", "Nairobi"),
    ("Germany", "Berlin"), ("China", "Beijing"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Thailand", "Bangkok"), ("Austria", "Vienna"), ("England", "London"), ("Egypt", "Cairo"),
)
CAPITALS_TRAIN_TEMPLATES = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "{country}'s capital is which city?",
)
CAPITALS_HELD_OUT_TEMPLATES = (
    "What city is the capital of {country}?",
    "Do you know the capital of {country}?",
    "I am visiting {country}. What is its capital city?",
    "Which city is {country}'s capital?",
)


@dataclass(frozen=True)
class NamedAnswerProblem(Problem):
    """A Problem whose check accepts any response that names `name` (case-insensitive), in
    whatever words: for facts a model already knows and states its own way."""

    name: str = ""

    def check(self, response: str) -> bool:
        return self.name.lower() in response.lower()


class CapitalsTask(Task):
    """"What is the capital of Veltoria?" -> "The capital of Veltoria is Quorin."

    The countries and capitals are invented (CAPITALS): a pretrained model cannot know them
    and makes something up, so learning them is visible. `split` draws the training
    questions from CAPITALS_TRAIN_TEMPLATES and the held-out ones from
    CAPITALS_HELD_OUT_TEMPLATES, over the same countries: a held-out question asks a trained
    fact in words never seen in training (memorising the training strings is not enough).
    `generate` draws from both template sets.

    `known_split` gives questions about real countries (REAL_CAPITALS), in the same answer
    format: mixed into training they keep fine-tuning from overwriting what the model knows
    (trained on invented capitals alone, SmolLM2 soon calls Germany's capital "Ostrelle");
    the held-out ones, other countries, measure that it still knows them.
    """

    name = "capitals"

    def __init__(self, n_countries: int = len(CAPITALS),
                 train_templates: tuple[str, ...] = CAPITALS_TRAIN_TEMPLATES,
                 held_out_templates: tuple[str, ...] = CAPITALS_HELD_OUT_TEMPLATES):
        if not 1 <= n_countries <= len(CAPITALS):
            raise ValueError(f"n_countries must be in 1..{len(CAPITALS)}, got {n_countries}")
        if not train_templates or not held_out_templates:
            raise ValueError("need at least one training and one held-out template")
        if set(train_templates) & set(held_out_templates):
            raise ValueError("a template is both a training and a held-out template")
        self.table = dict(CAPITALS[:n_countries])
        self.train_templates, self.held_out_templates = tuple(train_templates), tuple(held_out_templates)

    @staticmethod
    def answer(country: str, capital: str) -> str:
        return f"The capital of {country} is {capital}."

    def generate(self, rng: random.Random) -> Problem:
        country = rng.choice(sorted(self.table))
        template = rng.choice(self.train_templates + self.held_out_templates)
        return Problem(question=template.format(country=country), answer=self.answer(country, self.table[country]))

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """`n_train` training-phrasing and `n_test` held-out-phrasing questions about the
        invented countries, spread evenly over the countries (seeded order and phrasings).

        Raises ValueError when asked for more than n_countries x len(templates) of either.
        """
        rng = random.Random(f"{self.name}:{seed}")
        return (self._draw(self.table, self.train_templates, n_train, rng, "training"),
                self._draw(self.table, self.held_out_templates, n_test, rng, "held-out"))

    def known_split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """Questions about real countries: `n_train` in training phrasings about the first 8
        of REAL_CAPITALS, `n_test` in held-out phrasings about the other 8. Each is a
        NamedAnswerProblem: correct when the response names the capital, however phrased."""
        rng = random.Random(f"{self.name}-known:{seed}")
        half = len(REAL_CAPITALS) // 2
        return (self._draw(dict(REAL_CAPITALS[:half]), self.train_templates, n_train, rng, "known training"),
                self._draw(dict(REAL_CAPITALS[half:]), self.held_out_templates, n_test, rng, "known held-out", True))

    def _draw(self, table: dict[str, str], templates: tuple[str, ...], n: int, rng: random.Random,
              which: str, named: bool = False) -> list[Problem]:
        """n (country, template) questions, round-robin over the countries in a random order,
        each country taking its templates in its own random order: evenly spread."""
        if n < 0:
            raise ValueError(f"n_train and n_test must be >= 0, got {n}")
        if n > len(table) * len(templates):
            raise ValueError(f"task {self.name!r} has {len(table) * len(templates)} {which} questions "
                             f"({len(table)} countries x {len(templates)} phrasings); asked for {n}")
        countries = list(table)
        rng.shuffle(countries)
        orders = {c: rng.sample(templates, len(templates)) for c in countries}
        problems: list[Problem] = []
        for i in range(n):
            country = countries[i % len(countries)]
            template = orders[country][i // len(countries)]
            question, answer = template.format(country=country), self.answer(country, table[country])
            problems.append(NamedAnswerProblem(question=question, answer=answer, name=table[country]) if named
                            else Problem(question=question, answer=answer))
        return problems


_TASKS = {"arithmetic": ArithmeticTask, "capitals": CapitalsTask, "reverse": ReverseTask, "recall": RecallTask}


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kwargs) -> Task:
    """The task called `name`, built with `kwargs` (e.g. get_task("arithmetic", max_operand=9))."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    return _TASKS[name](**kwargs)
