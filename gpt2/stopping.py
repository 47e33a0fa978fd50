"""Stop requests from outside a run: a scheduler's SIGTERM, Ctrl-C, a closed terminal.

The first signal asks the run to stop after the current step, with a checkpoint; the trainer acts on it when its
state is consistent. Later signals change nothing: under torchrun and SLURM one stop arrives several times (the
agent forwards its SIGTERM to every worker, and `srun`/`scancel --signal` signal every process of the step), and
taking a repeat as "stop at once" lost the checkpoint. To stop without saving: SIGKILL (`kill -9`), or Ctrl-\\
(SIGQUIT). In a distributed run the ranks agree on the stop through `gpt2.distributed.StopVote`, so that every rank
saves the same step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gpt2.distributed import DistInfo, StopVote, print0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop a run with a checkpoint: a scheduler's notice, Ctrl-C, a closed terminal or dropped ssh."""


class StopSignals:
    """Catches the stop signals while entered (`with`), remembers the first, and tells the ranks' agreed answer.

    `requested` is this process's own signal (for work a single process may cut short, like an eval);
    `agreed(after_step)` is the signal number every rank agrees on (0: none), see `StopVote`."""

    def __init__(self, info: DistInfo, saving_to: Path) -> None:
        self.saving_to = saving_to
        self.signal: int | None = None
        self.since = math.inf  # time.perf_counter() when this rank learnt of the stop
        self.vote = StopVote(info)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self.vote.finish()
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self, after_step: bool = False) -> int:
        """After a training step, the vote issued after the step before (no wait); elsewhere a vote taken now."""
        local = self.signal or 0
        agreed = self.vote.after_step(local) if after_step else self.vote.now(local)
        self._learn(agreed)
        return agreed and self.signal

    def abandon_step(self, late: Callable[[], bool]) -> bool:
        """Between two micro-steps of a step: whether the ranks agree to abandon it, because a stop came and
        `late()` (finishing the step and saving would pass the grace) holds on some rank. A distributed vote is
        one micro-step behind, as `agreed` is one step behind."""
        agreed, abandon = self.vote.between_micro_steps(self.signal or 0, self.signal is not None and late())
        self._learn(agreed)
        return abandon

    def _learn(self, agreed: int) -> None:
        if agreed and self.signal is None:  # another rank's signal: this rank stops with it
            self.signal, self.since = agreed, time.perf_counter()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a repeat (see the module docstring): the save goes on
            return
        if signum == signal.SIGHUP and sys.stdout.isatty():  # the terminal is gone: writing to it would fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(devnull, fd)
        self.signal, self.since = signum, time.perf_counter()  # acted on by the trainer when its state is consistent
        print0(
            f"got {signal.Signals(signum).name}: finishing this step, then saving {self.saving_to} "
            "(further signals do not interrupt the save; kill -9 or Ctrl-\\ stops at once, without saving)"
        )
