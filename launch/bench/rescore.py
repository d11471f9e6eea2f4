"""Re-score a DASH bench JSON from the curves it stored: the target, every contender's seconds to
it (at the first evaluation at or above it, and interpolated between evaluations) and each
contender's ratio of medians to standard GRPO and to TRL. Runs nothing.

    python -m launch.bench.rescore runs/bench/tiny6.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from launch.bench.output import fmt, fmt_spread
from launch.bench.stats import Spread, aggregate, ratio_of_medians


def rescore_table(result: dict) -> str:
    """Markdown: per contender both seconds to target (median (min-max)) and both ratios to each peer."""
    agg = aggregate({n: [r["curve"] for r in c["runs"]] for n, c in result["contenders"].items()})

    def ratios(spreads: dict[str, Spread], name: str) -> str:
        return " / ".join(fmt(ratio_of_medians(spreads, name, peer), ".2f") for peer in ("standard_grpo", "trl_grpo"))

    rows = [f"start {agg.start_accuracy:.3f}, target {fmt(agg.target_accuracy, '.3f')}",
            "| contender | s to target (first eval) | s to target (interpolated) | vs standard_grpo / trl (first eval) "
            "| vs standard_grpo / trl (interpolated) |", "|---|---|---|---|---|"]
    for name in result["contenders"]:
        rows.append(f"| {name} | {fmt_spread(agg.seconds_to_target[name]._asdict())} "
                    f"| {fmt_spread(agg.interpolated_seconds_to_target[name]._asdict())} "
                    f"| {ratios(agg.seconds_to_target, name)} | {ratios(agg.interpolated_seconds_to_target, name)} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench.rescore", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench JSONs written by `python -m launch.bench dash`")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.json:
        with open(path) as f:
            print(f"{path}: " + rescore_table(json.load(f)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
