"""Synthetic tasks: the Mamba paper's (Gu & Dao, 2023, section 4.1), scaled down for a CPU, and
the state-tracking tasks of `state_tracking` (parity, modular counting, permutation composition).

- Selective copying: `num_memorize` data tokens (ids 1 .. vocab-3) scattered at random positions
  among `length` noise tokens (id 0), then a separator (vocab-2) and `num_memorize` answer slots
  (vocab-1); the model must emit the data tokens in order at the answer slots.  Content-aware
  selection is needed: where the tokens are changes from sequence to sequence.
- Induction heads: random tokens (ids 2 .. vocab-1) with a trigger (id 1) at a random position
  followed by a target token; the sequence ends with the trigger again and the model must predict
  the target after it.  Trained at one length, tested at longer ones (extrapolation).
- State tracking: a word of group elements and, at every position, the running product (the
  vocabulary is the group: input token and label class k are both element k).

The batch functions return (inputs, labels) with labels -100 everywhere except the positions
scored; `training.run_task` trains the small model of a variant on them and reports accuracy.
"""

from __future__ import annotations

import torch

from .state_tracking import STATE_TRACKING_TASKS, group_word_batch, task_group


def selective_copying_batch(batch: int, length: int, num_memorize: int, vocab: int, generator: torch.Generator):
    """inputs, labels: (batch, length + 1 + num_memorize).  labels[t] is the token to predict at t
    (next-token convention of the model: the loss compares labels[:, 1:] with predictions [:, :-1])."""
    if vocab < 4 or num_memorize > length:
        raise ValueError("selective copying needs vocab >= 4 and num_memorize <= length")
    data = torch.randint(1, vocab - 2, (batch, num_memorize), generator=generator)
    positions = torch.rand(batch, length, generator=generator).argsort(-1)[:, :num_memorize].sort(-1).values
    noise = torch.zeros(batch, length, dtype=torch.long).scatter(1, positions, data)
    tail = torch.full((batch, 1 + num_memorize), vocab - 1, dtype=torch.long)
    tail[:, 0] = vocab - 2
    inputs = torch.cat([noise, tail], 1)
    labels = torch.full_like(inputs, -100)
    labels[:, length + 1:] = data          # at answer slot k the k-th data token is due
    # shift: the model predicts labels[:, t] from inputs[:, :t]; answer k is predicted at the slot before
    return inputs, labels


def induction_heads_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    """inputs, labels: (batch, length + 1); only the last label (the target) is scored."""
    inputs = torch.randint(2, vocab, (batch, length + 1), generator=generator)
    where = torch.randint(0, length - 2, (batch,), generator=generator)
    rows = torch.arange(batch)
    inputs[rows, where] = 1
    target = inputs[rows, where + 1]
    inputs[:, -2] = 1                      # the trigger again ...
    labels = torch.full_like(inputs, -100)
    labels[:, -1] = target                 # ... and the target after it
    inputs[:, -1] = target
    return inputs, labels


PAPER_TASKS = ("selective-copying", "induction-heads")
TASKS = (*PAPER_TASKS, *STATE_TRACKING_TASKS)
PAPER_VOCAB = 16


def task_vocab(task: str, modulus: int = 3, group: str = "s3") -> int:
    """The model vocabulary of a task: PAPER_VOCAB for the paper's, the group's order for state tracking."""
    return PAPER_VOCAB if task in PAPER_TASKS else task_group(task, modulus, group).order


def chance_accuracy(task: str, vocab: int = PAPER_VOCAB) -> float:
    """Accuracy of a uniform guess among the classes a scored position can take."""
    if task == "selective-copying":
        return 1 / (vocab - 3)
    return 1 / (vocab - 2) if task == "induction-heads" else 1 / vocab


def task_batches(task: str, vocab: int, generator: torch.Generator, num_memorize: int = 16, modulus: int = 3,
                 group: str = "s3"):
    """make(n, length) -> (inputs, labels): fresh batches of `task` for a model of `vocab` tokens."""
    if task == "selective-copying":
        return lambda n, L: selective_copying_batch(n, L, num_memorize, vocab, generator)
    if task == "induction-heads":
        return lambda n, L: induction_heads_batch(n, L, vocab, generator)
    word_group = task_group(task, modulus, group)
    if vocab < word_group.order:
        raise ValueError(f"{task} over {word_group.name} needs a vocabulary of {word_group.order}, got {vocab}")
    return lambda n, L: group_word_batch(word_group, n, L, generator)
