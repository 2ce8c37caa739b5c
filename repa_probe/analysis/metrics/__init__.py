"""Pure metric functions (tensors in, numbers out; no files, no models).

- :mod:`~repa_probe.analysis.metrics.similarity`: alignment between two feature sets of the same N samples
  (CKNNA, mutual / cycle k-NN, linear CKA; the platonic-rep definitions), feature preparation, bootstrap.
- :mod:`~repa_probe.analysis.metrics.spatial`: spatial structure of one token grid (LDS, CDS, SRSS, RMSC; iREPA).
- :mod:`~repa_probe.analysis.metrics.frechet`: Fréchet distance between two Gaussians (FID / FD).
- :mod:`~repa_probe.analysis.metrics.correlation`: Pearson / Spearman over checkpoints, bootstrap interval, permutation p.

The alignment and spatial metrics are re-exported here (``from repa_probe.analysis.metrics import cknna, lds``).
"""
from repa_probe.analysis.errors import MetricInputError
from repa_probe.analysis.metrics.similarity import (bootstrap, bootstrap_replicates, cka, cknna, cycle_knn, mutual_knn,
                                                    prepare_features, unbiased_cka)
from repa_probe.analysis.metrics.spatial import SPATIAL_METRICS, SpatialSettings, cds, lds, rmsc, spatial_metrics, srss

__all__ = ["MetricInputError", "cknna", "mutual_knn", "cycle_knn", "cka", "unbiased_cka", "prepare_features",
           "bootstrap", "bootstrap_replicates", "SPATIAL_METRICS", "SpatialSettings", "lds", "cds", "srss", "rmsc", "spatial_metrics"]
