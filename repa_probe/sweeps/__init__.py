"""Sweeps (many checkpoints × analyses as submitit jobs, then one table per analysis) and studies (train, sweep,
report). See :mod:`repa_probe.sweeps.sweep` and :mod:`repa_probe.sweeps.study`."""
