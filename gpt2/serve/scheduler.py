"""Continuous batching: one thread owns the model and decodes every running request together, one token per
step; requests join a free row of the running batch (a prefill of their prompt, in chunks between decode steps
so that a long prompt does not stall the running streams) and leave it when they finish, so N concurrent
clients share each step's weight reads instead of queueing behind each other.

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
    prefilled: int = 0
    """How many prompt tokens are in the KV cache: the prompt is prefilled in chunks, between decode steps."""
    scored: list[TokenLogprob] = field(default_factory=list)
    """The prompt's tokens scored so far (with `prompt_logprobs`)."""
    last_logits: torch.Tensor | None = None
    """The logits after the last prompt token prefilled (1, V): they score the next chunk's first token."""


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
    """Runs `sampler`'s model over up to `rows` sequences at once; at most `max_waiting` more wait for a row.
    Between two decode steps at most `prefill_chunk` prompt tokens are prefilled, so a long prompt that arrives
    delays the running streams by a chunk's prefill per token, not by its whole prefill."""

    def __init__(self, sampler: Sampler, rows: int, max_waiting: int, prefill_chunk: int = 256) -> None:
        self.sampler, self.max_waiting, self.prefill_chunk = sampler, max_waiting, prefill_chunk
        sampler.prepare_for(rows)
        self.batch = Batch(
            sampler.model, rows, sampler.model.config.block_size, decode=sampler.decode, static=sampler.static
        )
        self.slots: list[Row | None] = [None] * rows
        self.waiting: deque[Row] = deque()
        self.prefilling: deque[int] = deque()  # slots whose prompts are not all in the cache yet, oldest first
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
        """Admit waiting rows into free slots, prefill up to `prefill_chunk` of their prompts' tokens, sample one
        token for every running row, decode one step."""
        self._admit()
        logits.update(self._prefill())
        if not logits:
            with self._wake:
                if not self.waiting and not self.prefilling and not self._stopping:
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
        if not any(self.batch.active):
            return {}
        out = self.batch.step(tokens.to(self.batch.cache.k.device))
        return {slot: out[slot : slot + 1] for slot, active in enumerate(self.batch.active) if active}

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

    def _admit(self) -> None:
        """Give waiting rows the free slots; their prompts are prefilled by `_prefill`."""
        with self._wake:
            free = [slot for slot, row in enumerate(self.slots) if row is None]
            while free and self.waiting:
                row = self.waiting.popleft()
                if not row.job.cancelled:
                    self.slots[free[0]] = row
                    self.prefilling.append(free.pop(0))

    def _prefill(self) -> dict[int, torch.Tensor]:
        """Prefill up to `prefill_chunk` prompt tokens of the admitted rows, oldest first (a long prompt over
        several iterations); returns the next-token logits (1, V) of the rows whose prompts are now complete."""
        budget, ready = self.prefill_chunk, {}
        while self.prefilling and budget:
            slot = self.prefilling[0]
            row = self.slots[slot]
            if row.job.cancelled:
                self.prefilling.popleft()
                self._free(slot)
                continue
            begin = row.prefilled
            chunk = row.ids[begin : begin + budget]
            row.prefilled, budget = begin + len(chunk), budget - len(chunk)
            complete = row.prefilled == len(row.ids)
            prefill = self.batch.start if begin == 0 else self.batch.extend
            logits = prefill(slot, torch.tensor(chunk), row.prompt_logprobs, complete)
            if row.prompt_logprobs:
                logits = score_prompt_chunk(row, begin, logits)
            if complete:
                self.prefilling.popleft()
                self._started(slot, row, logits, ready)
        return ready

    def _started(self, slot: int, row: Row, logits: torch.Tensor, ready: dict[int, torch.Tensor]) -> None:
        """A row whose prompt is in the cache: report its scores, then finish it (max_tokens 0) or let it decode."""
        if row.prompt_logprobs:
            row.job.emit(Event(row.index, tokens=row.scored))
        if row.max_tokens == 0:
            row.job.emit(Event(row.index, finish_reason="length"))
            self._free(slot)
            return
        if Penalties.needed(row.params):
            row.penalties = Penalties(row.params, [row.ids], logits.size(-1), logits.device)
        ready[slot] = logits

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
            self.prefilling.clear()
        for slot in range(len(self.slots)):
            self._free(slot)
        for job in {id(row.job): row.job for row in rows}.values():
            job.emit(Event(-1, error=message))


def score_prompt_chunk(row: Row, begin: int, logits: torch.Tensor) -> torch.Tensor:
    """Score the prompt tokens that a chunk's logits (T, V), from prompt position `begin`, and the previous
    chunk's last logits predict: token t by the logits at t - 1, the first by nothing (log-probability None),
    each with its `row.logprobs` most likely alternatives. Appends to `row.scored`; returns the last logits (1, V)."""
    end = begin + logits.size(0)
    if begin == 0:
        row.scored.append(TokenLogprob(row.ids[0], None, []))
        predicting, targets = logits[:-1], row.ids[1:end]
    else:
        predicting, targets = torch.cat([row.last_logits, logits[:-1]]), row.ids[begin:end]
    row.last_logits = logits[-1:]
    logprobs = torch.log_softmax(predicting.float(), dim=-1)  # (len(targets), V)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
    values, indices = torch.topk(logprobs, row.logprobs or 0, dim=-1)
    tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    row.scored += [TokenLogprob(t, lp, top) for t, lp, top in zip(targets, chosen, tops)]
    return row.last_logits
