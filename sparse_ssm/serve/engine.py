"""Continuous batching on the recurrent state: one decode loop (a thread) advances every running
sequence by one token per step, whatever request it belongs to.

    job = engine.submit(Job(prompt_ids, settings, top_logprobs=k), on_event)    # any thread
    ... on_event(Event(text=..., token=..., done=...)) per new token, then once with done set ...
    job.cancel()                                  # e.g. the client went away: the row is dropped

Prompts are prefilled with the parallel scan in chunks (chunked prefill): between two decode steps
the engine runs at most `prefill_chunk_tokens` prompt tokens - either one chunk of one prompt, or
the whole remainders of several prompts that fit together (those with as many tokens to read read
as one batch) - each prompt's `LayerState` carried from its chunk to the next.  A long prompt
therefore delays the running streams by one chunk a step, never by its whole prefill.  The prompts with the fewest tokens left go first, so a short
request joins within about one chunk's time even while a long prompt is being read; a prompt
passed over `max_batch` times in a row goes first (no starvation).  A prompt whose last chunk is done
joins the batch (its rows stacked on: `generate.cache.stack_rows`) and samples its first token at
that step; finished or cancelled jobs leave (`select_rows`).  A row's state has a constant size,
so a join or a leave costs one copy of the (b, H, N, P) states and nothing grows with the context.
At most `max_batch` jobs are admitted (being prefilled or decoding); further ones wait in arrival
order (at most `max_waiting`, else `submit` raises `EngineFull`).  Sampling per row is
`generate.sampling.next_token` with the job's own settings and generator, so a request decodes as
`generate_text` would on its own; rows that share their settings are drawn together
(`sample_group`: the same tokens, each from its job's generator, in one pass over their logits).

No request can stop the engine: a job whose prompt or draw fails ends with done="error" (and the
message in `Event.error`) and leaves the batch; a batched step that fails ends the jobs running
in it that way; the decode loop goes on with the next jobs.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
from dataclasses import dataclass, field

import torch

from ..generate.cache import select_rows, stack_rows
from ..generate.sampling import next_token, sample_group, seeded_generator
from ..generate.settings import PREFILL_CHUNK_TOKENS, GenerationConfig
from ..generate.text import TextStream

log = logging.getLogger(__name__)


class EngineFull(Exception):
    """More jobs wait than the engine accepts."""


@dataclass
class TokenLogprob:
    token: str                   # the token's own text
    logprob: float               # log-probability under the model (temperature 1, unfiltered)
    top: list[tuple[str, float]] = field(default_factory=list)     # the k most likely (text, logprob)


@dataclass
class Event:
    text: str = ""                        # new text safe to show ("" if none)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: str | None = None               # "stop", "length", "cancelled" or "error" on the last event
    error: str | None = None              # with done="error": what failed, for the client
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    prompt_ids: list[int]
    settings: GenerationConfig            # max_length (new tokens), temperature, top-k/p, penalty, seed, stops
    top_logprobs: int = -1                # -1: no log-probabilities; k >= 0: the token's and the top k
    on_event: object = None               # called from the engine thread with each Event
    cancelled: bool = False
    # set by the engine
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    new_tokens: int = 0
    prefilled: int = 0                    # prompt tokens prefilled so far
    prefill_state: list | None = None     # the prompt's cache after them (batch 1)
    passed_over: int = 0                  # prefill rounds that ran other prompts while this one waited

    def cancel(self):
        self.cancelled = True


def alike(plan: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
    """The (job, end) pairs of a prefill plan grouped by what one batched prefill needs equal: the
    number of tokens to read, and whether a state is carried (a fresh prompt or a continued one)."""
    groups: dict[tuple[int, bool], list[tuple[Job, int]]] = {}
    for job, end in plan:
        groups.setdefault((end - job.prefilled, job.prefill_state is None), []).append((job, end))
    return list(groups.values())


class BatchEngine:
    def __init__(self, model, tokenizer, eos_token_id: int | None, max_batch: int = 16, max_waiting: int = 64,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS):
        self.model, self.tokenizer, self.eos_token_id = model.eval(), tokenizer, eos_token_id
        self.max_batch, self.max_waiting, self.prefill_chunk_tokens = max_batch, max_waiting, prefill_chunk_tokens
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Job] = collections.deque()
        self.prefilling: list[Job] = []       # admitted, their prompts being read
        self.running: list[Job] = []          # the rows of the decoding batch
        self.steps = 0                        # decode steps taken (batched)
        self.changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sparse-ssm-decode", daemon=True)

    def start(self) -> "BatchEngine":
        self._thread.start()
        return self

    def stop(self, wait: bool = True):
        """Finish every job with done="cancelled" and end the decode thread (`wait`: join it)."""
        with self.changed:
            self._stopping = True
            self.changed.notify_all()
        if wait and self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job) -> Job:
        with self.changed:
            if self._stopping:
                raise EngineFull("the server is shutting down")
            admitted = len(self.running) + len(self.prefilling)
            if len(self.waiting) >= self.max_waiting and admitted >= self.max_batch:
                raise EngineFull(f"{admitted} requests are running and {len(self.waiting)} waiting "
                                 f"(the limits are --max-batch {self.max_batch} and --max-waiting {self.max_waiting})")
            self.waiting.append(job)
            self.changed.notify_all()
        return job

    def status(self) -> dict:
        with self.changed:
            return self._status()

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block until predicate(status()) holds (checked whenever the batch changes)."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self._status()), timeout)

    def _status(self) -> dict:
        return {"running": len(self.running) + len(self.prefilling), "prefilling": len(self.prefilling),
                "waiting": len(self.waiting), "max_batch": self.max_batch, "max_waiting": self.max_waiting,
                "steps": self.steps}

    # --- the decode thread ---------------------------------------------------------------
    @torch.no_grad()
    def _loop(self):
        cache, logits = None, None
        while self._admit():
            cache, logits = self._prefill_round(cache, logits)
            try:
                cache, logits = self._decode_step(cache, logits)
            except Exception as e:           # the batched step failed: its jobs end with the error, the engine goes on
                log.exception("the decode step failed; its %d requests end with an error", len(self.running))
                with self.changed:
                    failed, self.running = self.running, []
                    self.changed.notify_all()
                for job in failed:
                    self._fail(job, e)
                cache, logits = None, None
        with self.changed:
            for job in [*self.running, *self.prefilling, *self.waiting]:
                self._emit(job, Event(done="cancelled", prompt_tokens=len(job.prompt_ids),
                                      completion_tokens=job.new_tokens))
            self.running, self.prefilling, self.waiting = [], [], collections.deque()
            self.changed.notify_all()

    def _admit(self) -> bool:
        """Wait for work; admit the waiting jobs that fit (False: the engine stops)."""
        with self.changed:
            while not self._stopping and not self.running and not self.prefilling and not self.waiting:
                self.changed.wait()
            while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
                self.prefilling.append(self.waiting.popleft())
            return not self._stopping

    def _prefill_round(self, cache, logits):
        """Prefill at most `prefill_chunk_tokens` prompt tokens (`_prefill_plan`); the prompts that
        are done join the batch: the next (cache, logits).  Prompts of the round that start alike
        (`alike`) are read in one batched prefill, one pass over the weights for all of them (eight
        16-token prompts arriving at once: one prefill of 8 rows, not eight).  A prompt that fails
        (or whose job was cancelled) ends only its own job: a batched read that fails is redone one
        prompt at a time."""
        for group in alike(self._prefill_plan()):
            lasts = None
            if len(group) > 1:
                try:
                    lasts = self._read(group)
                except Exception:            # noqa: BLE001 - which prompt failed is found one by one below
                    log.warning("a batched prefill of %d prompts failed; reading them one by one", len(group))
            for i, (job, end) in enumerate(group):
                try:
                    last = lasts[i] if lasts else self._read([(job, end)])[0]
                    if end == len(job.prompt_ids):
                        cache, logits = self._join(job, last, cache, logits)
                except Exception as e:       # this prompt failed: only its request ends with the error
                    log.exception("a request failed while its prompt was read")
                    self._leave_prefill(job)
                    self._fail(job, e)
        return cache, logits

    def _read(self, group: list[tuple[Job, int]]) -> list[torch.Tensor]:
        """Prefill the prompts of `group` (alike) up to their ends in one call: each job's state and
        count of prefilled tokens move on; the last token's logits (1, vocab) of each."""
        ids = torch.tensor([job.prompt_ids[job.prefilled:end] for job, end in group], device=self.device)
        states = [job.prefill_state for job, _ in group]
        carried = None if states[0] is None else states[0] if len(states) == 1 else stack_rows(states)
        last, state = self.model.prefill(ids, carried)
        for i, (job, end) in enumerate(group):
            job.prefill_state, job.prefilled = (state if len(group) == 1 else select_rows(state, [i])), end
        return [last[i:i + 1] for i in range(len(group))]

    def _prefill_plan(self) -> list[tuple[Job, int]]:
        """The prompts to read in this round and the token each is read up to: the one passed over
        `max_batch` times (else the one with the fewest tokens left) and, when it is read to its end,
        every further whole remainder that fits in the round's `prefill_chunk_tokens`."""
        for job in [j for j in self.prefilling if j.cancelled]:
            self._leave_prefill(job)
            self._emit(job, Event(done="cancelled", prompt_tokens=len(job.prompt_ids)))
        jobs = sorted(self.prefilling, key=lambda j: (j.passed_over < self.max_batch, len(j.prompt_ids) - j.prefilled))
        plan, budget = [], self.prefill_chunk_tokens
        for job in jobs:
            left = len(job.prompt_ids) - job.prefilled
            if plan and left > budget:
                break
            plan.append((job, job.prefilled + min(left, budget)))
            budget -= min(left, budget)
            if budget == 0:
                break
        for job in self.prefilling:
            job.passed_over = 0 if any(job is j for j, _ in plan) else job.passed_over + 1
        return plan

    def _leave_prefill(self, job: Job):
        with self.changed:
            self.prefilling = [j for j in self.prefilling if j is not job]
            self.changed.notify_all()

    def _decode_step(self, cache, logits):
        """Sample a token for every row and take one batched step: the next (cache, logits), or
        (None, None) when no row goes on."""
        if not self.running:
            return None, None
        tokens, keep = self._sample(logits)
        with self.changed:
            if len(keep) < len(self.running):
                self.running = [self.running[i] for i in keep]
            self.steps += 1
            self.changed.notify_all()
        if not keep:
            return None, None
        if len(keep) < len(tokens):
            cache, tokens = select_rows(cache, keep), tokens[keep]
        logits, cache = self.model.step(tokens.to(self.device), cache)
        return cache, logits

    def _fail(self, job: Job, error: Exception):
        self._emit(job, Event(done="error", error=f"generation failed ({type(error).__name__}: {error}); other "
                                                  f"requests are not affected, and this one may be sent again",
                              prompt_tokens=len(job.prompt_ids), completion_tokens=job.new_tokens))

    def _join(self, job: Job, last: torch.Tensor, cache, logits):
        """Append `job`'s prefilled rows (its prompt's state, the last token's logits (1, vocab)) to
        the batch: the next (cache, logits)."""
        settings, state = job.settings, job.prefill_state
        job.stream = TextStream(self.tokenizer, settings.stop_strings, self.eos_token_id)
        job.generator = seeded_generator(settings.seed if settings.seed is not None else random.getrandbits(63))
        job.seen = torch.zeros(last.shape[-1], dtype=torch.bool)
        job.seen[torch.tensor(job.prompt_ids).clamp(max=last.shape[-1] - 1)] = True
        cache, logits = (state, last) if cache is None else (stack_rows([cache, state]), torch.cat([logits, last]))
        job.prefill_state = None
        with self.changed:
            self.prefilling = [j for j in self.prefilling if j is not job]
            self.running.append(job)
            self.changed.notify_all()
        return cache, logits

    def _sample(self, logits: torch.Tensor):
        """One token per running row: (tokens (b,), indices of the rows that go on).  A row whose
        sampling fails ends its job with the error; the other rows go on."""
        rows = logits.float().cpu()
        tokens = torch.zeros(len(self.running), dtype=torch.long)
        keep, live = [], []
        for i, job in enumerate(list(self.running)):
            if job.cancelled:
                self._emit(job, Event(done="cancelled", prompt_tokens=len(job.prompt_ids),
                                      completion_tokens=job.new_tokens))
            else:
                live.append(i)
        drawn = self._draw_groups(rows, live)
        for i in live:
            job = self.running[i]
            try:
                token = drawn[i] if i in drawn else next_token(rows[i], job.seen, job.settings, job.generator)
                tokens[i], goes_on = self._take_token(job, rows[i], token)
            except Exception as e:
                log.exception("a request failed while its next token was drawn")
                self._fail(job, e)
                continue
            if goes_on:
                keep.append(i)
        return tokens, keep

    def _draw_groups(self, rows: torch.Tensor, live: list[int]) -> dict[int, int]:
        """The tokens of the rows whose jobs share their sampling settings with another row, drawn a
        group at a time (`sample_group`: the tokens `next_token` draws, each from its job's generator);
        {row: token}.  Rows left out (alone, or a group that failed) are drawn one by one."""
        groups = collections.defaultdict(list)
        for i in live:
            settings = self.running[i].settings
            groups[(settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty)].append(i)
        drawn = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            jobs = [self.running[i] for i in members]
            try:
                tokens = sample_group(rows[members], torch.stack([j.seen for j in jobs]), jobs[0].settings,
                                      [j.generator for j in jobs])
            except Exception:  # noqa: BLE001 - drawn row by row instead, where each failure reaches its job
                tokens = None
            drawn.update(zip(members, tokens or []))
        return drawn

    def _take_token(self, job: Job, logits: torch.Tensor, token: int) -> tuple[int, bool]:
        """Record `job`'s next token (drawn from its logits (vocab,)) and emit its event: (token, goes on)."""
        job.seen[token] = True
        job.new_tokens += 1
        stopped = token == self.eos_token_id or job.stream.push(token)
        done = "stop" if stopped else ("length" if job.new_tokens >= job.settings.max_length else None)
        wants = job.top_logprobs >= 0 and token != self.eos_token_id        # end-of-text is not text
        logprobs = [self._logprob(logits, token, job.top_logprobs)] if wants else []
        self._emit(job, Event(job.stream.take(final=done is not None), logprobs, done,
                              prompt_tokens=len(job.prompt_ids), completion_tokens=job.new_tokens))
        return token, done is None

    def _logprob(self, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        top = []
        if k > 0:
            values, ids = torch.topk(logp, min(k, logp.shape[-1]))
            top = [(self.tokenizer.decode([int(t)]), float(v)) for v, t in zip(values, ids)]
        return TokenLogprob(self.tokenizer.decode([token]), float(logp[token]), top)

    @staticmethod
    def _emit(job: Job, event: Event):
        if job.on_event is not None:
            job.on_event(event)
