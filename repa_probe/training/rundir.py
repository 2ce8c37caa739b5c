"""The run directory: resolved config, checkpoint policy (naming, retention, latest / fallback), metric logs.

Policy only: what a checkpoint holds is ``TrainState.state_dict`` (training.trainer); how a file is written
and read is ``repa_probe.checkpoint`` (``atomic_save``, ``load_training_checkpoint``).

Layout of ``{run.out_dir}/{run.name}/``::

    config.yaml            resolved config of the run (written at start)
    checkpoints/0000100.pt training checkpoints, ``{step:07d}.pt``
    metrics.jsonl          one JSON object per log line
    tb/                    TensorBoard event files
    train.log              the log lines printed to stdout
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from repa_probe.checkpoint import atomic_save
from repa_probe.errors import ReproError

log = logging.getLogger("repa_probe")

CKPT_RE = re.compile(r"^(\d{7,})\.pt$")


class RunDirError(ReproError, RuntimeError):
    """The run directory cannot be used (not writable, no loadable checkpoint, ...)."""


# What a run is, for its whole life: a rerun (resume) that changes any of these keys is refused.
RUN_DEFINING = ("model", "objective", "repa", "encoder.name", "encoder.pretrained", "encoder.input_size",
                "vae.name", "data.name", "data.resolution", "data.num_classes", "run.seed")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(run: Path, new_config: dict) -> None:
    """Refuse (:class:`RunDirError`, nothing touched) to continue the run in ``run`` with a config whose
    run-defining keys (:data:`RUN_DEFINING`) differ from its stored ``config.yaml`` while it has checkpoints."""
    import yaml

    stored_path = run / "config.yaml"
    if not list_checkpoints(run / "checkpoints") or not stored_path.is_file():
        return
    try:
        stored = _flat(yaml.safe_load(stored_path.read_text()) or {})
    except (OSError, ValueError, yaml.YAMLError):
        raise RunDirError(f"{stored_path} is unreadable; the run's checkpoints cannot be matched to a config. "
                          "Start a new run with run.name=NEW") from None
    new = _flat(new_config)
    differ = [k for k in sorted(set(stored) | set(new))
              if any(k == d or k.startswith(d + ".") for d in RUN_DEFINING) and stored.get(k) != new.get(k)]
    if differ:
        shown = ", ".join(f"{k}={new.get(k)!r} (stored {stored.get(k)!r})" for k in differ[:4])
        raise RunDirError(f"run {run} has checkpoints of another model/setup: {shown}"
                          f"{' ...' if len(differ) > 4 else ''}; to continue it keep its config.yaml values, or "
                          "start a new run with run.name=NEW (or another run.out_dir)")


def prepare(out_dir: str, name: str) -> Path:
    """Create ``out_dir/name/checkpoints`` and check that it is writable."""
    run = Path(out_dir) / name
    try:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run / f".write_test.{os.getpid()}"  # one per process: DDP ranks check at the same time
        probe.write_text("ok")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise RunDirError(f"output directory {run} is not writable ({exc.strerror or exc}); "
                          f"set run.out_dir to a writable path") from None
    return run


def remove_new_run(run: Path, made: Path) -> None:
    """Undo :func:`prepare` after a start that failed: remove ``run`` (only while it holds no checkpoint) and
    its parents up to ``made``, the first folder that start created."""
    if list_checkpoints(run / "checkpoints"):
        return
    for path in sorted(run.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
    for folder in [run, *run.parents]:
        if not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()
        if folder == made:
            break


def checkpoint_run(path) -> Optional[str]:
    """The run a checkpoint file belongs to: the name of ``<run>`` in ``<run>/checkpoints/<file>``, else None."""
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" else None


def checkpoint_label(path) -> str:
    """The one short name of a checkpoint in tables and folders: ``"<run>/<stem>"`` for a file in a run's
    ``checkpoints/``, else the file stem. Built here only; readers take the run from :func:`checkpoint_run`
    (or the ``run`` of ``summary.json``), never by splitting a label."""
    p, run = Path(path), checkpoint_run(path)
    return f"{run}/{p.stem}" if run is not None else p.stem


def list_checkpoints(ckpt_dir: Path) -> List[Tuple[int, Path]]:
    """All ``{step:07d}.pt`` files in ``ckpt_dir`` as (step, path), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{step:07d}.pt"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep_last: int, keep_every: int
                    ) -> Tuple[Path, List[Path]]:
    """Write ``state`` atomically as ``{step:07d}.pt``, then apply the retention policy (:func:`prune`).

    Returns (path written, paths removed).
    """
    path = checkpoint_path(ckpt_dir, step)
    atomic_save(state, path)
    return path, prune(ckpt_dir, keep_last, keep_every)


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> List[Path]:
    """Delete checkpoints beyond the last ``keep_last``, except multiples of ``keep_every``."""
    ckpts = list_checkpoints(ckpt_dir)
    removed = []
    for step, path in ckpts[:-keep_last] if keep_last > 0 else []:
        if keep_every > 0 and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_latest(ckpt_dir: Path, loader) -> Optional[Tuple[Path, dict]]:
    """Load the newest checkpoint that ``loader`` can open; corrupt ones are skipped loudly.

    Returns None when there is no checkpoint at all; raises RunDirError when every one is unreadable.
    """
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    errors = []
    for step, path in reversed(ckpts):
        try:
            return path, loader(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to an older one
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            older = "falling back to the previous one" if step != ckpts[0][0] else "it was the oldest one"
            log.warning("WARNING: checkpoint %s cannot be loaded (%s); %s", path, msg, older)
            errors.append(msg)
    raise RunDirError(f"no loadable checkpoint in {ckpt_dir} ({len(errors)} tried, all unreadable)")


class MetricLogger:
    """Append metrics to ``metrics.jsonl`` and (optionally) TensorBoard; only used on rank 0."""

    def __init__(self, run: Path, tensorboard: bool = True):
        self.path = run / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tb"))
            except ImportError:  # tensorboard is a declared dependency; tolerate a minimal install
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, step: int, values: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run: Path) -> List[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_file_log(run: Path) -> logging.Handler:
    """Mirror the ``repa_probe`` log lines into ``run/train.log``."""
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler
