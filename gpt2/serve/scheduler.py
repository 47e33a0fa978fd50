"""Continuous batching: one thread owns the model and decodes every running request together, one token per
step; requests join a free row of the running batch (a prefill of their prompt) and leave it when they finish,
so N concurrent clients share each step's weight reads instead of queueing behind each other.

The HTTP side (`gpt2.serve.api`) submits a `Job` and reads its events from an asyncio queue; the scheduler
thread puts them there with `call_soon_threadsafe`. A cancelled job (its client went away) frees its rows at
the next step. References: vLLM's scheduler (iteration-level batching, Orca, OSDI '22), in one small loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from gpt2.sampling import Batch, Penalties, Sampler, SamplingParams, TextStream, sample_next_token

log = logging.getLogger("gpt2.serve")


class TokenLogprob(NamedTuple):
    """A token of a prompt or a completion, its log-probability under the model (None for a prompt's first token,
    which nothing predicts) and the `top` most likely tokens at its position, (id, log-probability) best first."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a job's client receives: a text piece of choice `index` and the log-probabilities of its new tokens
    (when asked), or its end (`finish_reason` "stop" or "length"), or an `error` that ends the whole job."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    tokens: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Row:
    """One sequence to generate: choice `index` of a job. `max_tokens` 0 scores the prompt only."""

    job: "Job"
    index: int
    ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stream: TextStream
    max_tokens: int
    logprobs: int | None = None
    """Report each generated token's log-probability and the `logprobs` most likely ones (None: no)."""
    prompt_logprobs: bool = False
    """Report the prompt's tokens' log-probabilities too (first, in one event)."""
    generated: int = 0
    penalties: Penalties | None = None


@dataclass
class Job:
    """One request's rows and the asyncio queue its `Event`s go to (created on the event loop's thread)."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    """More rows are waiting than the server takes; the client should retry later (HTTP 503)."""


class Scheduler:
    """Runs `sampler`'s model over up to `rows` sequences at once; at most `max_waiting` more wait for a row."""

    def __init__(self, sampler: Sampler, rows: int, max_waiting: int) -> None:
        self.sampler, self.max_waiting = sampler, max_waiting
        sampler.prepare_for(rows)
        self.batch = Batch(
            sampler.model, rows, sampler.model.config.block_size, decode=sampler.decode, static=sampler.static
        )
        self.slots: list[Row | None] = [None] * rows
        self.waiting: deque[Row] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what is still waiting or running (their clients get an error event) and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job's rows; QueueFull if that would put more than `max_waiting` rows in the queue."""
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(job.rows) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (max_waiting={self.max_waiting})")
            self.waiting.extend(job.rows)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        return {"running": sum(row is not None for row in self.slots), "waiting": len(self.waiting)}

    # ------------------------------------------------------------------------------------------------------
    # The scheduler thread.

    def _run(self) -> None:
        with torch.inference_mode():
            logits: dict[int, torch.Tensor] = {}  # row -> its next-token logits (1, V)
            while not self._stopping:
                try:
                    logits = self._iteration(logits)
                except Exception:  # a bug: fail what runs, keep serving
                    log.exception("generation failed; ending the requests in flight")
                    self._end_all("internal error while generating; see the server log")
                    logits = {}
            self._end_all("the server is shutting down")

    def _iteration(self, logits: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Admit waiting rows into free slots, sample one token for every running row, decode one step."""
        logits.update(self._admit())
        if not logits:
            with self._wake:
                if not self.waiting and not self._stopping:
                    self._wake.wait()
            return {}
        tokens = torch.zeros(len(self.slots), dtype=torch.long)
        slots = list(logits)
        chosen = [self._choose(self.slots[slot], logits[slot]) for slot in slots]
        values = iter(torch.cat(chosen).tolist())  # one sync for every row's token (and log-probabilities)
        for slot, picked in zip(slots, chosen):
            row = self.slots[slot]
            token, *scores = [next(values) for _ in range(picked.numel())]
            if row.job.cancelled or self._deliver(row, int(token), scores):
                self._free(slot)
            else:
                tokens[slot] = int(token)
        if not any(self.slots):
            return {}
        out = self.batch.step(tokens.to(self.batch.cache.k.device))
        return {slot: out[slot : slot + 1] for slot, row in enumerate(self.slots) if row is not None}

    @staticmethod
    def _choose(row: Row, logits: torch.Tensor) -> torch.Tensor:
        """The row's next token, on the device, as a float tensor: (token,), or with `row.logprobs` (token, its
        log-probability, the top k's log-probabilities, their ids). Each row has its own settings and generator;
        log-probabilities are the model's own (before temperature, top-k/p and penalties)."""
        params = row.params
        chosen = logits if row.penalties is None else row.penalties.apply(logits)
        token = sample_next_token(
            chosen, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=row.generator
        )
        if row.penalties is not None:
            row.penalties.update(token)
        if row.logprobs is None:
            return token.float()
        logprobs = torch.log_softmax(logits.float(), dim=-1)[0]
        top = torch.topk(logprobs, row.logprobs)
        return torch.cat([token.float(), logprobs[token], top.values, top.indices.float()])

    def _admit(self) -> dict[int, torch.Tensor]:
        started = {}
        while True:
            with self._wake:
                free = [slot for slot, row in enumerate(self.slots) if row is None]
                if not free or not self.waiting:
                    return started
                row = self.waiting.popleft()
            if row.job.cancelled:
                continue
            slot = free[0]
            self.slots[slot] = row
            logits = self.batch.start(slot, torch.tensor(row.ids), every_position=row.prompt_logprobs)
            if row.prompt_logprobs:
                row.job.emit(Event(row.index, tokens=prompt_logprobs(logits, row.ids, row.logprobs or 0)))
                logits = logits[-1:]
            if row.max_tokens == 0:
                row.job.emit(Event(row.index, finish_reason="length"))
                self._free(slot)
                continue
            if Penalties.needed(row.params):
                row.penalties = Penalties(row.params, [row.ids], logits.size(-1), logits.device)
            started[slot] = logits

    def _deliver(self, row: Row, token: int, scores: list[float]) -> bool:
        """Send what `token` adds to the row's text (and its log-probabilities, `scores` from `_choose`); True
        when the row has finished."""
        row.generated += 1
        tokens = []
        if scores:
            k = (len(scores) - 1) // 2
            tokens = [TokenLogprob(token, scores[0], list(zip(map(int, scores[1 + k :]), scores[1 : 1 + k])))]
        if token == self.sampler.tokenizer.eot_id:
            row.job.emit(Event(row.index, row.stream.finish(), "stop", tokens=tokens))
            return True
        piece = row.stream.push(token)
        if row.stream.stopped:
            row.job.emit(Event(row.index, piece, "stop", tokens=tokens))
            return True
        if row.generated == row.max_tokens:
            row.job.emit(Event(row.index, piece + row.stream.finish(), "length", tokens=tokens))
            return True
        if piece or tokens:
            row.job.emit(Event(row.index, piece, tokens=tokens))
        return False

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        self.batch.free(slot)

    def _end_all(self, message: str) -> None:
        with self._wake:
            rows = [row for row in self.slots if row is not None] + list(self.waiting)
            self.waiting.clear()
        for slot in range(len(self.slots)):
            self._free(slot)
        for job in {id(row.job): row.job for row in rows}.values():
            job.emit(Event(-1, error=message))


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """The prompt's tokens scored by its prefill's logits (T, V): token t by the logits at t - 1, the first by
    nothing (log-probability None), each with its `top` most likely alternatives."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T - 1, V)
    targets = torch.tensor(ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    values, indices = torch.topk(logprobs, top, dim=-1)
    tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [TokenLogprob(ids[0], None, [])] + [TokenLogprob(t, lp, tp) for t, lp, tp in zip(ids[1:], chosen, tops)]
