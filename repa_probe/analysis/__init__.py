"""Analyses of trained checkpoints. The folders follow the pipeline:

- ``core/``: typed options, the one input resolver, the run skeleton, file writers, feature capture,
  encoder targets, the shared figure style;
- ``metrics/``: pure metric functions (k-NN / CKA alignment, spatial structure, Fréchet distance);
- ``alignment/``, ``probes/``, ``generation/`` (sampling to folders, FID), ``correlation/``: the analyses.

The entry points and their options are exported here; they are imported on first use, so that importing
one part (e.g. ``repa_probe.analysis.metrics``) does not load every analysis and its plotting stack.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AnalysisOptions": "repa_probe.analysis.core.options",
    "AlignmentOptions": "repa_probe.analysis.core.options",
    "ProbeOptions": "repa_probe.analysis.core.options",
    "Analysis": "repa_probe.analysis.core.runner",
    "run_analysis": "repa_probe.analysis.core.runner",
    "run_alignment": "repa_probe.analysis.alignment.run",
    "run_probes": "repa_probe.analysis.probes.run",
    "SampleOptions": "repa_probe.analysis.generation.options",
    "FidOptions": "repa_probe.analysis.generation.options",
    "sample_checkpoints": "repa_probe.analysis.generation.run",
    "run_fid": "repa_probe.analysis.generation.run",
    "run_correlate": "repa_probe.analysis.correlation.correlate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
