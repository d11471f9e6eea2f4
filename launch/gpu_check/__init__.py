"""The GPU check: what `launch/gpu_check.sh` runs on a lent GPU machine (and, with tiny shapes, on
CPU as a rehearsal). `__main__` runs the steps and prints the table, `steps` holds one measurement
per step, `wheels` builds the carried wheel directory (`make gpu-wheels`)."""
