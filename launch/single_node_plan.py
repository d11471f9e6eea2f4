"""What `launch/single_node.sh` needs before it starts a Ray head: the config validated and this
machine checked (`launch.placement.preflight`), then one line "NUM_CPUS DS_ACCELERATOR": the CPUs
the head must advertise for the run's reservations, and the learner's accelerator as the
config's placement decides it (never whether a GPU happens to be visible: a CPU preset on a GPU
box keeps its learner on CPU). Exit 2 with "config error: ..." otherwise.

    python -m launch.single_node_plan tiny-cpu train.iterations=2
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from launch.config import ConfigError, load_config
from launch.placement import ds_accelerator, preflight
from launch.train import needed_cpus, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(str(Path(args.resume) / "config.yaml") if args.resume else args.config, args.overrides)
        preflight(cfg, joins_cluster=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(max(os.cpu_count() or 1, needed_cpus(cfg)), ds_accelerator(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
