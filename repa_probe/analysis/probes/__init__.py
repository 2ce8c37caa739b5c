"""Probes on frozen features: linear classification (top-1 / top-5) and linear segmentation (mIoU).

- :func:`fit_linear_probe` — ``(N, D)`` features + labels → :class:`ProbeResult` (sklearn or torch backend).
- :func:`fit_segmentation_probe` — ``(N, T, D)`` or ``(N, D, h, w)`` tokens + ``(N, H, W)`` masks → :class:`SegResult`.
- :func:`miou`, :func:`confusion_matrix`, :func:`iou_from_confusion` — the segmentation metric.

The run on checkpoints (features, datasets, CSV/JSON/figures) is :mod:`repa_probe.analysis.probes.run`; the
VOC / ADE20K datasets are :mod:`repa_probe.data.segmentation`.
"""
from repa_probe.analysis.probes.linear import BACKENDS, ProbeResult, fit_linear_probe, stratified_holdout
from repa_probe.analysis.probes.segmentation import SegResult, confusion_matrix, fit_segmentation_probe, iou_from_confusion, miou

__all__ = [
    "ProbeResult", "fit_linear_probe", "stratified_holdout", "BACKENDS",
    "SegResult", "fit_segmentation_probe", "miou", "confusion_matrix", "iou_from_confusion",
]
