"""The analyses' user errors: three kinds a caller can tell apart (all :class:`~repa_probe.errors.ReproError`, so
every command line prints them as one line and exits with code 2).

- :class:`OptionsError`: an option with a bad value, or an unknown option (the message names the flag);
- :class:`AnalysisInputError`: inputs that do not fit (checkpoints, data, encoder, VAE, layers and times, sample
  folders, reference statistics, result tables, too few samples, an output folder that cannot be written);
- :class:`MetricInputError`: arrays a metric or a probe cannot take (shapes, dtypes, labels, non-finite values,
  parameters).
"""
from __future__ import annotations

from repa_probe.errors import ReproError

__all__ = ["OptionsError", "AnalysisInputError", "MetricInputError"]


class OptionsError(ReproError, ValueError):
    """An analysis option with a bad value, or an unknown option (one-line message naming the flag)."""


class AnalysisInputError(ReproError, ValueError):
    """Analysis inputs that do not fit together or cannot be read; one-line message."""


class MetricInputError(ReproError, ValueError):
    """Input a metric or probe cannot take (shape, dtype, labels, values or parameters); one-line message."""
