"""The state-tracking benchmark of the recent linear-RNN papers: the regular and context-free tasks of
Deletang et al. 2023 ("Neural Networks and the Chomsky Hierarchy"), as Grazzi et al. (ICLR 2025),
Mamba-3, Gated DeltaNet and PD-SSM report them, and the group word problems (S3, A5, S5) of
Merrill et al. 2024 ("The Illusion of State") and Siems et al. (DeltaProduct).

Each task reads a random string and answers with a class; a task with `every_position` answers
after every token (the word problems: the running product), the others once, after the whole string:

- `parity-check`: bits; the answer is their sum mod 2.
- `even-pairs`: bits; whether the number of unequal neighbours ("01" and "10") is odd (1) or even (0).
- `cycle-navigation`: actions 0, 1, 2 (step -1, stay, step +1) on a cycle of 5 from position 0;
  the answer is the final position.
- `modular-arithmetic`: digits 0..4 and operators +, -, * alternating (an odd length: an even one
  is cut by one, as in the source), evaluated mod 5 with * before + and -, left to right.
- `modular-arithmetic-brackets`: a random bracketed expression of exactly the given length over
  digits 0..4, unary minus and +, -, * (Deletang et al.'s grammar with multiplication, as their
  experiments use it), evaluated mod 5.
- `word-problem`: uniform random elements of a group (`state_tracking.GROUPS`); after every
  element, the product of the prefix.

Tokens are the alphabet's ids 0 .. alphabet-1, then QUERY (= alphabet) that asks for the answer;
class k is token id k.  `ChomskyTask.batch` lays a string of length L out for the causal LM's
next-token convention: inputs (batch, L + 2) = string, QUERY, answer; labels -100 except the last
(the answer, predicted at the QUERY position, which has seen the whole string).  A word problem uses
`state_tracking.group_word_batch` (inputs (batch, L + 1), labels at positions 1 .. L).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from .state_tracking import GROUPS, group_word_batch

MODULUS = 5                       # modular arithmetic and cycle navigation, as in the source
PLUS, MINUS, TIMES, OPEN, CLOSE = 5, 6, 7, 8, 9        # operator and bracket token ids after the digits 0..4
SYMBOLS = {PLUS: "+", MINUS: "-", TIMES: "*", OPEN: "(", CLOSE: ")", **{d: str(d) for d in range(MODULUS)}}


def parity_check(batch: int, length: int, generator: torch.Generator):
    """strings (batch, length) of bits; answers (batch,): the number of ones mod 2."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    return bits, bits.sum(1) % 2


def even_pairs(batch: int, length: int, generator: torch.Generator):
    """strings (batch, length) of bits; answers (batch,): the number of unequal neighbours mod 2."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    return bits, (bits[:, 1:] != bits[:, :-1]).sum(1) % 2


def cycle_navigation(batch: int, length: int, generator: torch.Generator):
    """strings (batch, length) of actions 0, 1, 2 (move -1, 0, +1); answers (batch,): the final
    position on a cycle of MODULUS positions, starting at 0."""
    actions = torch.randint(0, 3, (batch, length), generator=generator)
    return actions, (actions - 1).sum(1) % MODULUS


def evaluate_flat(tokens: list[int]) -> int:
    """The value mod MODULUS of digit, operator, digit, ... with * binding tighter than + and -."""
    total, term, sign = 0, tokens[0], 1
    for op, digit in zip(tokens[1::2], tokens[2::2]):
        if op == TIMES:
            term = term * digit % MODULUS
        else:
            total, term, sign = total + sign * term, digit, (1 if op == PLUS else -1)
    return (total + sign * term) % MODULUS


def modular_arithmetic(batch: int, length: int, generator: torch.Generator):
    """strings (batch, n) with n = length, or length - 1 when length is even: digits at even
    positions, operators (uniform among +, -, *) at odd ones; answers (batch,): the value mod 5."""
    n = length if length % 2 else length - 1
    strings = torch.randint(0, MODULUS, (batch, n), generator=generator)
    strings[:, 1::2] = torch.randint(PLUS, TIMES + 1, (batch, n // 2), generator=generator)
    return strings, torch.tensor([evaluate_flat(row) for row in strings.tolist()], dtype=torch.long)


def bracket_expression(length: int, rng: random.Random) -> tuple[list[int], int]:
    """A random expression of exactly `length` tokens (>= 1) and its value mod MODULUS: d, -d,
    (d), (-d) for lengths 1 to 4; longer ones are (left op right) with the left part's length uniform
    in 1 .. length - 4 and op uniform among +, -, *."""
    if length < 1:
        raise ValueError(f"a bracketed expression needs length >= 1, got {length}")
    if length <= 4:
        digit = rng.randrange(MODULUS)
        negated = length in (2, 4)
        core = [MINUS, digit] if negated else [digit]
        return ([OPEN, *core, CLOSE] if length >= 3 else core), (-digit if negated else digit) % MODULUS
    left_length = rng.randint(1, length - 4)
    left, a = bracket_expression(left_length, rng)
    right, b = bracket_expression(length - 3 - left_length, rng)
    op = rng.choice((PLUS, MINUS, TIMES))
    value = a + b if op == PLUS else a - b if op == MINUS else a * b
    return [OPEN, *left, op, *right, CLOSE], value % MODULUS


def modular_arithmetic_brackets(batch: int, length: int, generator: torch.Generator):
    """strings (batch, length): `bracket_expression`s; answers (batch,): their values mod 5.  The
    recursion draws from a Python RNG seeded from `generator`, so a seeded generator repeats."""
    rng = random.Random(int(torch.randint(0, 2 ** 62, (), generator=generator)))
    rows = [bracket_expression(length, rng) for _ in range(batch)]
    return (torch.tensor([r[0] for r in rows], dtype=torch.long),
            torch.tensor([r[1] for r in rows], dtype=torch.long))


@dataclass(frozen=True)
class ChomskyTask:
    """A task: `alphabet` input symbols, `classes` answers (chance 1 / classes, as the papers
    count it), `sample(batch, length, generator) -> strings, answers`; `every_position`: the answer
    comes after every token (labels (batch, length)) instead of once at the end (the word problems)."""

    name: str
    alphabet: int
    classes: int
    sample: Callable
    every_position: bool = False

    @property
    def vocab(self) -> int:
        """Model vocabulary: the alphabet, QUERY, and the answer ids (the classes) where they exceed it."""
        return self.alphabet if self.every_position else max(self.alphabet + 1, self.classes)

    @property
    def chance(self) -> float:
        return 1 / self.classes

    def batch(self, batch: int, length: int, generator: torch.Generator):
        """inputs, labels for the model (module docstring): (batch, L + 2), or (batch, length + 1)
        for a word problem; L is `length` (one less for an even modular-arithmetic length)."""
        if self.every_position:
            return self.sample(batch, length, generator)
        strings, answers = self.sample(batch, length, generator)
        query = torch.full((batch, 1), self.alphabet, dtype=torch.long)
        inputs = torch.cat([strings, query, answers[:, None]], 1)
        labels = torch.full_like(inputs, -100)
        labels[:, -1] = answers
        return inputs, labels


def word_problem(group: str) -> ChomskyTask:
    """The word problem of GROUPS[group] (s3, a5, s5): the running product at every position."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
    finite_group = GROUPS[group]()
    return ChomskyTask(f"word-problem-{group}", finite_group.order, finite_group.order,
                       lambda n, L, g: group_word_batch(finite_group, n, L, g), every_position=True)


DELETANG_TASKS = {
    "parity-check": ChomskyTask("parity-check", 2, 2, parity_check),
    "even-pairs": ChomskyTask("even-pairs", 2, 2, even_pairs),
    "cycle-navigation": ChomskyTask("cycle-navigation", 3, MODULUS, cycle_navigation),
    "modular-arithmetic": ChomskyTask("modular-arithmetic", TIMES + 1, MODULUS, modular_arithmetic),
    "modular-arithmetic-brackets": ChomskyTask("modular-arithmetic-brackets", CLOSE + 1, MODULUS,
                                               modular_arithmetic_brackets),
}
CHOMSKY_TASKS = (*DELETANG_TASKS, "word-problem")


def chomsky_task(name: str, group: str = "s3") -> ChomskyTask:
    """The task called `name` (one of CHOMSKY_TASKS); `group` picks the word problem's group."""
    if name == "word-problem":
        return word_problem(group)
    if name not in DELETANG_TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(CHOMSKY_TASKS)}")
    return DELETANG_TASKS[name]


def scaled_accuracy(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 1 is perfect, 0 is chance (below chance is negative)."""
    return (accuracy - chance) / (1 - chance)
