"""`python -m launch.bench {learner,engine,sync,dash,all} ...`: see launch/bench/cli.py."""
import sys

from launch.bench.cli import main

sys.exit(main())
