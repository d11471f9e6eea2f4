"""Run outputs: metrics.jsonl (one record per iteration), samples.jsonl (a few completions per
iteration: prompt, completion, gold, reward, advantage), TensorBoard, optional W&B, a console line
per iteration, and plots.png at the end.

Used by `python -m launch.train`; nothing here runs on its own.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PHASES = ("generate", "score", "learn", "sync", "eval", "other")


class PhaseTimer:
    """Wall seconds per named phase of one iteration; `other` = total minus the named phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def finish(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        named = sum(v for k, v in self.seconds.items() if k != "score")  # score runs inside generate
        out = {f"time/{k}": self.seconds.get(k, 0.0) for k in PHASES if k != "other"}
        out["time/other"] = max(0.0, total - named)
        out["time/total"] = total
        return out


class MetricsLogger:
    """Appends one JSON record per iteration and mirrors scalars to TensorBoard (and W&B if asked)."""

    def __init__(self, run_dir: Path, use_wandb: bool, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if use_wandb:
            import wandb  # optional; the config validation names it when missing

            self.wandb = wandb.init(project="dash-rl", name=run_name, config=config, dir=str(run_dir))

    def truncate_after(self, iteration: int) -> None:
        """Resume continues the same streams: drop records written after the checkpoint resumed from."""
        for path in (self.path, self.samples_path):
            if path.exists():
                kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["iteration"] <= iteration]
                path.write_text("".join(l + "\n" for l in kept))

    def log_samples(self, records: list[dict]) -> None:
        """Append completions (one JSON object each, with an "iteration" key) to samples.jsonl."""
        with self.samples_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict) -> None:
        # Strict JSON: a NaN (e.g. the loss of an iteration whose every sample was filtered) is null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["iteration"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []


def console_line(r: dict) -> str:
    loss = "   n/a " if r["loss"] is None or r["loss"] != r["loss"] else f"{r['loss']:+.4f}"
    return (f"it {r['iteration']:>4} | reward {r['reward_mean']:.3f} | acc {r['accuracy']:.3f} | kept {r['kept_fraction']:.2f} "
            f"| len {r['response_length_mean']:.1f} | loss {loss} | gen {r['time/generate']:.1f}s "
            f"learn {r['time/learn']:.1f}s sync {r['time/sync']:.2f}s | {r['tokens_per_second']:.0f} tok/s | v{r['policy_version']}"
            # off-policy samples (train.overlap): how stale, and how much the correction weights spread
            # drift: |learner - sampler| logprob per token at the batch's first step (the staleness's cost)
            + (f" | stale {r['staleness_mean']:.1f} drift {r['logprob_diff_mean']:.3f} ess {r['effective_sample_size']:.2f}"
               if r["staleness_max"] else ""))


def write_plots(run_dir: Path, evals: list[tuple[int, float]]) -> Path:
    """plots.png: reward, eval accuracy, response length and the per-iteration time breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    its = [r["iteration"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].plot(its, [r["reward_mean"] for r in records], label="train reward")
    axes[0, 0].plot(its, [r["kept_fraction"] for r in records], label="kept fraction", alpha=0.6)
    axes[0, 0].set_title("reward / kept fraction")
    axes[0, 0].legend()
    if evals:
        axes[0, 1].plot([e[0] for e in evals], [e[1] for e in evals], marker="o")
    axes[0, 1].set_title("held-out greedy accuracy")
    axes[1, 0].plot(its, [r["response_length_mean"] for r in records])
    axes[1, 0].set_title("mean response length (tokens)")
    bottom = [0.0] * len(records)
    for phase in PHASES:
        vals = [r.get(f"time/{phase}", 0.0) for r in records]
        if phase == "score":
            continue  # inside generate
        axes[1, 1].bar(its, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1, 1].set_title("seconds per iteration")
    axes[1, 1].legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    out = Path(run_dir) / "plots.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
