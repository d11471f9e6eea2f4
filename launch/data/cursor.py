"""The training cursor: a checkpointable walk over the training prompts.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py tests/test_faults.py
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from launch.data.splits import text_hash
from rollout_workers.types import Prompt


class PromptCursor:
    """Walks a prompt list in a fresh deterministic shuffle per epoch (from (seed, epoch)), wrapping
    across epochs (a batch may span two). `state()`/`load_state()` make a resumed run draw exactly
    the prompts an uninterrupted one would (resume covers the data cursor)."""

    def __init__(self, prompts: Sequence[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptCursor needs at least one prompt")
        if len({p.uid for p in prompts}) != len(prompts):
            raise ValueError("PromptCursor needs prompts with distinct uids")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._fingerprint = text_hash("\n".join(p.uid for p in self.prompts))[:16]
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"cursor/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts, never one twice: the engines and the learner tell a batch's groups
        apart by prompt uid. A batch that crosses into a new epoch passes over the new epoch's
        prompts it already holds (it drew them at the end of the last epoch), so those are not
        drawn again in the new epoch. `n` may not exceed the number of prompts."""
        if not 1 <= n <= len(self.prompts):
            raise ValueError(f"a batch of {n} distinct prompts cannot be drawn from {len(self.prompts)}")
        batch: list[Prompt] = []
        held: set[str] = set()
        while len(batch) < n:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation()
            prompt = self.prompts[self._order[self.index]]
            self.index += 1
            if prompt.uid not in held:
                held.add(prompt.uid)
                batch.append(prompt)
        return batch

    def state(self) -> dict:
        """Checkpointable position: epoch, index, seed and a fingerprint of the prompt list."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_prompts": len(self.prompts), "prompts_sha": self._fingerprint}

    def load_state(self, state: dict) -> None:
        """Continue from `state()`; a clear error if it belongs to another prompt list."""
        if state.get("prompts_sha") != self._fingerprint or state.get("num_prompts") != len(self.prompts):
            raise ValueError(f"cursor state is for a different prompt list ({state.get('num_prompts')} prompts, "
                             f"sha {state.get('prompts_sha')}) than this one ({len(self.prompts)}, {self._fingerprint})")
        if not 0 <= state["index"] <= len(self.prompts) or state["epoch"] < 0:
            raise ValueError(f"cursor state out of range: epoch {state['epoch']}, index {state['index']}")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()
