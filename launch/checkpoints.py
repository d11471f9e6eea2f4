"""Run checkpoints: the learner's DeepSpeed state, a Hugging Face export of the policy, and the
driver's own state (iteration, policy version, data cursor, RNG, sample counts, evals).

Written atomically (a `.tmp-` directory, a COMPLETE marker, then a rename), so a checkpoint whose
writer was killed is never picked up: `latest_complete` ignores it and returns the previous one.
The driver (launch.train) hands its state over as a `RunState`; this module knows nothing of it.

    python -m launch.train --resume RUN_DIR     # continues from latest_complete(RUN_DIR)
    PYTHONPATH=$PWD python -m pytest -q tests/test_e2e.py -k resume
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

MARKER = "COMPLETE"


class CheckpointedLearner(Protocol):
    """What a checkpoint needs of the learner (learner.actor.LearnerGroup)."""

    def save_checkpoint(self, path: str) -> None: ...
    def load_checkpoint(self, path: str) -> None: ...
    def export_hf(self, path: str) -> None: ...


@dataclass
class RunState:
    """The driver state a checkpoint carries besides the learner's and the RNGs."""

    iteration: int
    version: int
    cursor: dict
    """The data cursor's `PromptCursor.state()`."""
    samples_generated: int
    samples_kept: int
    train_seconds: float
    prompts_refused: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    """The driver's own keys (evals, stopped_by), stored alongside and given back as they were."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_complete(run_dir: Path) -> Path | None:
    """Newest checkpoint that has its COMPLETE marker; half-written ones are ignored."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob("iter_*") if (p / MARKER).exists()) if root.exists() else []
    return done[-1] if done else None


def save(run_dir: Path, learner: CheckpointedLearner, state: RunState, keep: int) -> Path:
    """Write checkpoint iter_<state.iteration> (with the process's Python and torch RNG states)
    and delete all but the newest `keep` complete ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{state.iteration:06d}"
    tmp = root / f".tmp-iter_{state.iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    learner.save_checkpoint(str(tmp / "learner"))
    learner.export_hf(str(tmp / "hf"))
    driver_state = {
        "iteration": state.iteration, "version": state.version, "cursor": state.cursor,
        "samples_generated": state.samples_generated, "samples_kept": state.samples_kept,
        "prompts_refused": dict(state.prompts_refused), "train_seconds": state.train_seconds,
        "python_rng": random.getstate(), **state.extra,
    }
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("iter_*") if (p / MARKER).exists())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_latest(run_dir: Path, learner: CheckpointedLearner) -> RunState:
    """Load the newest complete checkpoint into `learner` and the process's RNGs; the rest of the
    driver's state comes back as a RunState for the caller to apply."""
    path = latest_complete(run_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)} to resume from")
    driver_state = json.loads((path / "driver_state.json").read_text())
    learner.load_checkpoint(str(path / "learner"))
    version, internal, gauss = driver_state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.load(path / "torch_rng.pt", weights_only=True))
    keys = ("iteration", "version", "cursor", "samples_generated", "samples_kept", "train_seconds", "prompts_refused")
    return RunState(**{k: driver_state.pop(k) for k in keys}, extra=driver_state)
