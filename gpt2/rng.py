"""Each rank's random-number generator state, resumable. Dropout is the only consumer: the data order comes
from the loader's own seeded state, and no numpy/python RNG is used. Ranks draw different dropout masks, so
each rank's state is saved (one entry per rank) and restored to the same rank."""

from __future__ import annotations

from typing import Any

import torch

from gpt2 import distributed


class RankRNG:
    """Stateful: `state_dict()` gathers every rank's torch CPU (and current CUDA device) RNG state, in rank
    order; `load_state_dict` restores this rank's (a rank the checkpoint did not have keeps its seed)."""

    def __init__(self, device: torch.device, rank: int) -> None:
        self.device, self.rank = device, rank

    def state_dict(self) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        return distributed.all_gather_object(self.local_state())

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's state (no communication), for `set_local_state`."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_local_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if self.rank >= len(states):
            return
        torch.set_rng_state(states[self.rank]["cpu"].clone())
        if self.device.type == "cuda" and "cuda" in states[self.rank]:
            torch.cuda.set_rng_state(states[self.rank]["cuda"].clone(), self.device)
