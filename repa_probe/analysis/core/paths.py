"""The paths an analysis is given on its command line, expanded: a file is itself, a folder means the files
its finder picks in it, and (where the option allows) a glob pattern means what it matches. Every other path
is refused, naming the option. ``--ckpt`` (:func:`checkpoint_paths`) and
``--tables`` (:func:`~repa_probe.analysis.correlation.correlate.find_tables`) read their paths through it."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Sequence

from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.training.rundir import list_checkpoints


def expand_paths(items: Sequence, option: str, in_folder: Callable[[Path], list[Path]], folder_holds: str,
                 patterns: bool = False) -> list[Path]:
    """``items`` (paths as given to ``option``, e.g. ``"--ckpt"``) -> files, in order. A folder contributes
    ``in_folder(folder)``, which must not be empty (the error says it should hold ``folder_holds``); with
    ``patterns`` a glob pattern contributes its sorted matches (and must match something)."""
    out: list[Path] = []
    for item in items:
        text = str(item)
        matches = [Path(text)]
        if patterns and glob.has_magic(text):
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise AnalysisInputError(f"{option} {text!r}: the pattern matches nothing")
        for p in matches:
            if p.is_dir():
                found = in_folder(p)
                if not found:
                    raise AnalysisInputError(f"{option} {p}: directory has no {folder_holds}")
                out += found
            elif p.is_file():
                out.append(p)
            else:
                raise AnalysisInputError(f"{option} {p}: no such file or directory")
    if not out:
        raise AnalysisInputError(f"nothing given ({option} PATH)")
    return out


def _checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoints of a run folder (its ``checkpoints/`` if it has one) by step, else its ``*.pt`` / ``*.pth``."""
    d = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    return [q for _, q in list_checkpoints(d)] or sorted(list(d.glob("*.pt")) + list(d.glob("*.pth")))


def checkpoint_paths(items: Sequence) -> list[Path]:
    """Files as given; a directory means every checkpoint in it (or in its ``checkpoints/``), by step. A file
    listed twice (directly or through its run directory) is refused."""
    out = expand_paths(items, "--ckpt", _checkpoints_in, "checkpoints ({step:07d}.pt, *.pt or *.pth)")
    seen: dict[Path, Path] = {}
    for q in out:
        if q.resolve() in seen:
            raise AnalysisInputError(f"--ckpt: checkpoint {q} is listed twice (also as {seen[q.resolve()]}, "
                                     "directly or through its run directory)")
        seen[q.resolve()] = q
    return out
