"""The project's file writers: every result file (CSV, JSON, text, PNG, ``.npz``) is written atomically.

:func:`repa_probe.atomic.atomic_write` is the one rule (re-exported here); checkpoints use
:func:`repa_probe.checkpoint.atomic_save`, the same rule for ``torch.save``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from repa_probe.atomic import atomic_write

__all__ = ["atomic_write", "write_text", "write_csv", "write_json", "read_json", "begin_outputs", "end_outputs",
           "INCOMPLETE"]

INCOMPLETE = "INCOMPLETE"  # marker file of an output folder whose run has not finished (interrupted or failed)


def write_text(path, text: str) -> Path:
    """``text`` -> ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text))


def write_csv(rows: Sequence[dict], path, columns: Sequence[str]) -> Path:
    """Rows -> CSV with ``columns`` (missing or None values as empty cells; extra keys ignored), atomically."""
    def write(f):
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

    return atomic_write(path, write)


def _clean(obj):
    """NaN / inf floats -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, torch.device)) or dataclasses.is_dataclass(obj):
        return str(obj)
    return repr(obj)


def write_json(obj: Any, path) -> Path:
    """``obj`` -> strict JSON (NaN/inf as null; paths, devices, dataclasses as strings; tensors as lists),
    indented, written atomically."""
    return write_text(path, json.dumps(_clean(obj), indent=2, default=_json_default))


def read_json(path, default=None):
    """The JSON at ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


# ------------------------------------------------------------------------------------ one run per folder
def begin_outputs(out, names: Sequence[str]) -> list[str]:
    """Make ``out`` hold one run's outputs: remove an earlier run's (``names``, ``summary.json``, everything
    under ``figures/``, left-over ``.*.tmp`` files; other files, such as sample folders a run resumes, are
    left alone) and write the :data:`INCOMPLETE` marker, which :func:`end_outputs` removes once the run is
    complete.

    Returns the removed paths, relative to ``out``.
    """
    out = Path(out)
    candidates = [out / n for n in [*names, "summary.json"]]
    candidates += sorted(p for p in (out / "figures").rglob("*") if p.is_file()) if (out / "figures").is_dir() else []
    candidates += sorted(out.glob(".*.tmp"))
    removed = []
    for path in dict.fromkeys(candidates):
        if path.is_file():
            path.unlink()
            removed.append(str(path.relative_to(out)))
    write_text(out / INCOMPLETE, "The run writing this folder has not finished (interrupted or failed): its "
                                 "files are partial. Rerun the same command to redo them.\n")
    return removed


def end_outputs(out) -> None:
    """The run writing ``out`` is complete: remove the :data:`INCOMPLETE` marker."""
    (Path(out) / INCOMPLETE).unlink(missing_ok=True)
