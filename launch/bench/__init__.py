"""Benchmarks (one module per bench; the command line is launch/bench/cli.py).

    python -m launch.bench all [--quick] [--skip dash]
"""
