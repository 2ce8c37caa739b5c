"""How numbers and metric names are written in every report (the one owner of formatting).

A value is shown with 3 significant digits, or, when it has a 95% interval, with as many decimals as the
interval resolves (two significant digits of its half-width): ``0.4712 [0.4511, 0.4913]`` -> ``0.471 [0.451,
0.491]``, ``1234.5 [1190, 1279]`` -> ``1234 [1190, 1279]``. Sentences, Markdown / HTML / LaTeX tables and the
single-run ``report.md`` files all go through :func:`decimals` and :func:`fmt`, so a number printed in a
sentence is the number printed in its table (both are the CSV value rounded the same way).
"""
from __future__ import annotations

import math

SIGNIFICANT = 3  # significant digits of a value without interval
MAX_DECIMALS = 6

_LABELS = {"cknna": "CKNNA", "mutual_knn": "mutual kNN", "cka": "CKA", "unbiased_cka": "unbiased CKA",
           "cycle_knn": "cycle kNN", "lds": "LDS", "cds": "CDS", "srss": "SRSS", "rmsc": "RMSC", "top1": "top-1",
           "top5": "top-5", "miou": "mIoU", "pixel_acc": "pixel accuracy", "fid_inception": "FID",
           "inception_score": "IS", "kid_inception": "KID", "precision_inception": "precision",
           "recall_inception": "recall", "fd_dinov2_vitl14": "FD-DINOv2"}
LOWER_IS_BETTER = ("fid", "fd_", "kid")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def decimals(value, low=None, high=None) -> int:
    """Decimals to show ``value``: two significant digits of the interval's half-width when ``low``/``high``
    are given, else :data:`SIGNIFICANT` significant digits of the value (0..:data:`MAX_DECIMALS`)."""
    if finite(low) and finite(high) and high > low:
        d = 1 - math.floor(math.log10((high - low) / 2))
    elif finite(value) and value != 0:
        d = SIGNIFICANT - 1 - math.floor(math.log10(abs(value)))
    else:
        d = SIGNIFICANT - 1
    return max(0, min(MAX_DECIMALS, d))


def fmt(value, places: int | None = None, sign: bool = False) -> str:
    """``value`` with ``places`` decimals (default :func:`decimals`; an int as is); ``sign``: always a leading
    + or -. Non-finite or missing values are ``"n/a"``; ``-0.00`` is written ``0.00``."""
    if not finite(value):
        return "n/a"
    if isinstance(value, int) and places is None:  # counts stay integers
        return f"{value:+d}" if sign else str(value)
    places = decimals(value) if places is None else places
    text = f"{value:{'+' if sign else ''}.{places}f}"
    if float(text) == 0:
        text = f"{0.0:{'+' if sign else ''}.{places}f}"
    return text


def fmt_interval(value, low, high, sign: bool = False) -> str:
    """``"0.471 [0.451, 0.491]"`` (all three with the interval's decimals; ``sign``: a signed value, e.g. a
    difference ``"+0.14 [0.11, 0.17]"``), or the value alone."""
    if not (finite(low) and finite(high)):
        return fmt(value, sign=sign)
    places = decimals(value, low, high)
    return f"{fmt(value, places, sign)} [{fmt(low, places)}, {fmt(high, places)}]"


def metric_label(name: str) -> str:
    """Display name of a metric: ``cknna`` -> ``CKNNA``, ``fd_tiny_vit`` -> ``FD (tiny_vit)``."""
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith("fd_"):
        return f"FD ({name[3:]})"
    return name


def lower_is_better(name: str) -> bool:
    return name.startswith(LOWER_IS_BETTER)


def time_label(t) -> str:
    """``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``, ``"step:250"`` as is."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return f"{float(t):g}"
    return str(t)
