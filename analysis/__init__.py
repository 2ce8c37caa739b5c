"""Command-line entry points (thin: they parse arguments and call :mod:`repa_probe`)."""
import os

# OpenMP threads that spin while waiting make a 2-thread CPU run 10-30x slower whenever another process
# shares the cores (measured here: 0.07 s vs 2 s per step of the tiny model). Waiting passively costs
# little on an idle machine; set OMP_WAIT_POLICY yourself to override. Must happen before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
