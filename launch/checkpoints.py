"""Run checkpoints: the learner's DeepSpeed state, a Hugging Face export of the policy, and the
driver's own state (iteration, policy version, data cursor, RNG, sample counts, evals).

Written atomically (a `.tmp-` directory, a COMPLETE marker, then a rename), so a checkpoint whose
writer was killed is never picked up: `latest_complete` ignores it and returns the previous one.

    python -m launch.train --resume RUN_DIR     # continues from latest_complete(RUN_DIR)
"""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from launch.train import Run

MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_complete(run_dir: Path) -> Path | None:
    """Newest checkpoint that has its COMPLETE marker; half-written ones are ignored."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob("iter_*") if (p / MARKER).exists()) if root.exists() else []
    return done[-1] if done else None


def save(run: "Run", extra: dict) -> Path:
    root = checkpoint_dir(run.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{run.iteration:06d}"
    tmp = root / f".tmp-iter_{run.iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    run.learner.save_checkpoint(str(tmp / "learner"))
    run.learner.export_hf(str(tmp / "hf"))
    state = {
        # A batch prefetched but not yet learned (train.overlap, interrupted) is not in the
        # checkpoint: the cursor is saved from before it, so --resume samples it again.
        "iteration": run.iteration, "version": run.version,
        "cursor": run.prefetched.cursor_before if run.prefetched else run.cursor.state(),
        "samples_generated": run.samples_generated, "samples_kept": run.samples_kept,
        "prompts_refused": dict(run.prompts_refused), "train_seconds": run.train_seconds, "python_rng": random.getstate(), **extra,
    }
    (tmp / "driver_state.json").write_text(json.dumps(state))
    torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("iter_*") if (p / MARKER).exists())[:-run.cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_latest(run: "Run") -> dict:
    path = latest_complete(run.run_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run.run_dir)} to resume from")
    state = json.loads((path / "driver_state.json").read_text())
    run.learner.load_checkpoint(str(path / "learner"))
    run.cursor.load_state(state["cursor"])
    run.iteration, run.version = state["iteration"], state["version"]
    run.samples_generated, run.samples_kept = state["samples_generated"], state["samples_kept"]
    run.prompts_refused = Counter(state["prompts_refused"])
    run.train_seconds = state["train_seconds"]
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.load(path / "torch_rng.pt", weights_only=True))
    run.logger.truncate_after(run.iteration)
    return state
