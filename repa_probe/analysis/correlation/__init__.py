"""Correlation of quantities across checkpoints (e.g. alignment at a layer vs FID): tables in, statistics and
figures out (:func:`~repa_probe.analysis.correlation.correlate.run_correlate`)."""
