"""State-tracking tasks: the word problem of a finite group, label at every position.

A word is a sequence of group elements g_0, g_1, ... (the input tokens are the elements' indices)
and the label at position t is the running product y_t = g_0 g_1 ... g_t.  Three families:

- `parity`: the cyclic group Z_2; tokens are bits and y_t is the parity of bits 0..t.
- `modular-counting`: Z_m (m = 3, 5, ...); y_t = (token_0 + ... + token_t) mod m.
- `permutation-composition`: S3 (the smallest non-abelian group), A5 or S5.

Diagonal SSMs whose transitions have eigenvalues in [0, 1] cannot do parity at arbitrary length,
no diagonal SSM can count modulo 3, and none with commuting transitions can compose non-abelian
permutations (Merrill, Petty & Sabharwal 2024; Grazzi et al. 2025): this is what non-diagonal
selective state matrices are for.  A5 is the smallest non-solvable group (its word problem is
NC1-complete, Barrington 1989: the hard case of those papers) with 60 elements against S5's 120,
and it is the rotation group of the icosahedron, a subgroup of SO(3): 3 x 3 rotations represent
it exactly, inside one 4 x 4 block, and need no determinant -1 (which no zero-order-hold
transition exp(dt A) has).  S5's faithful representations of positive determinant need 5
dimensions (its 4-dimensional ones give odd permutations determinant -1).  A5 is the one the
benchmark tables use; S5 is available with `group="s5"`.

Every group is built from permutations of {0 .. n-1}, written as tuples p with p[i] the image of
i.  Product convention: p q is "p, then q", (p q)[i] = q[p[i]] (permutations act on the right,
as in GAP), and the running product multiplies each new element on the right: y_t = y_{t-1} g_t.
Elements are indexed by a fixed enumeration: Z_m's element k is the rotation i -> i + k (mod m),
so its index is the residue k; S_n lists itertools.permutations(range(n)) in lexicographic order
and A_n the even ones among them, in the same order (index 0 is the identity in every group).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

STATE_TRACKING_TASKS = ("parity", "modular-counting", "permutation-composition")


@dataclass(frozen=True, eq=False)
class FiniteGroup:
    """A finite group given by its elements (permutations) and multiplication table."""

    name: str
    elements: tuple                  # elements[k]: the permutation (a tuple) of index k
    table: torch.Tensor              # (n, n) long: table[a, b] = index of elements[a] elements[b]

    @property
    def order(self) -> int:
        return len(self.elements)

    def running_products(self, words: torch.Tensor) -> torch.Tensor:
        """words (batch, L) of element indices -> (batch, L): [:, t] = index of words[:, 0] ... words[:, t]."""
        out = torch.empty_like(words)
        product = words[:, 0]
        out[:, 0] = product
        for t in range(1, words.shape[1]):
            product = self.table[product, words[:, t]]
            out[:, t] = product
        return out


def compose(p: tuple, q: tuple) -> tuple:
    """The permutation p q: first p, then q ((p q)[i] = q[p[i]])."""
    return tuple(q[i] for i in p)


def group_from_permutations(name: str, permutations) -> FiniteGroup:
    """The group of these permutations (in this order), with its table; a ValueError when a
    product falls outside the set (they are not closed under composition)."""
    elements = tuple(tuple(p) for p in permutations)
    index = {p: k for k, p in enumerate(elements)}
    table = torch.empty(len(elements), len(elements), dtype=torch.long)
    for a, p in enumerate(elements):
        for b, q in enumerate(elements):
            product = compose(p, q)
            if product not in index:
                raise ValueError(f"{name}: {p} {q} = {product} is not in the set (not closed)")
            table[a, b] = index[product]
    return FiniteGroup(name, elements, table)


def is_even(p: tuple) -> bool:
    """Whether the permutation has an even number of inversions."""
    return sum(p[i] > p[j] for i, j in itertools.combinations(range(len(p)), 2)) % 2 == 0


@functools.cache
def cyclic_group(m: int) -> FiniteGroup:
    """Z_m as the rotations of m points; element k (i -> i + k mod m) is the residue k."""
    if m < 2:
        raise ValueError(f"a cyclic group needs m >= 2, got {m}")
    return group_from_permutations(f"Z{m}", [tuple((i + k) % m for i in range(m)) for k in range(m)])


@functools.cache
def symmetric_group(n: int) -> FiniteGroup:
    """S_n: all permutations of n points, lexicographic order."""
    return group_from_permutations(f"S{n}", itertools.permutations(range(n)))


@functools.cache
def alternating_group(n: int) -> FiniteGroup:
    """A_n: the even permutations of n points, lexicographic order."""
    return group_from_permutations(f"A{n}", (p for p in itertools.permutations(range(n)) if is_even(p)))


GROUPS = {"s3": lambda: symmetric_group(3), "a5": lambda: alternating_group(5), "s5": lambda: symmetric_group(5)}


def task_group(task: str, modulus: int = 3, group: str = "s3") -> FiniteGroup:
    """The group whose word problem `task` is: Z_2, Z_modulus, or GROUPS[group]."""
    if task == "parity":
        return cyclic_group(2)
    if task == "modular-counting":
        return cyclic_group(modulus)
    if task == "permutation-composition":
        return GROUPS[group]()
    raise ValueError(f"unknown state-tracking task {task!r}; choose from {', '.join(STATE_TRACKING_TASKS)}")


def group_word_batch(group: FiniteGroup, batch: int, length: int, generator: torch.Generator):
    """inputs, labels: (batch, length + 1) long.  inputs are uniform random element indices
    g_0 .. g_length; labels[:, t + 1] = y_t, the index of the running product g_0 ... g_t, for
    t < length, and labels[:, 0] = -100.  The model's next-token convention compares labels[:, 1:]
    with its predictions at [:, :-1], so every one of the `length` positions 0 .. length-1 is
    scored on the product up to and including its own token; the last token is never scored."""
    inputs = torch.randint(0, group.order, (batch, length + 1), generator=generator)
    labels = torch.full_like(inputs, -100)
    labels[:, 1:] = group.running_products(inputs[:, :length])
    return inputs, labels
