"""Sampling and FID on the shared run skeleton (:func:`~repa_probe.analysis.core.runner.run_analysis`).

- :func:`sample_checkpoints` (``python -m analysis.sample``): every checkpoint sampled into ``out_dir`` (one
  checkpoint) or ``out_dir/<label>/`` (several); ``sample.csv`` (one row per folder), ``summary.json``,
  ``options.json``.
- :func:`run_fid` (``python -m analysis.fid``): every checkpoint sampled into ``out_dir/samples/<label>/``,
  or every ``--samples`` folder / ``.npz`` taken as it is (a source like a checkpoint), then evaluated against
  the reference: ``fid.csv``, ``summary.json``, ``options.json``, ``reference_stats.pt``,
  ``figures/fid_vs_step.{pdf,png}``.

Every user error (options, checkpoints, Inception weights, reference, encoders) surfaces in ``setup``, before
any sampling. The reference goes through each feature extractor once, and each extractor's weights are loaded
once, whatever the number of checkpoints. Under torchrun each rank samples its share; rank 0 alone evaluates
and writes (the skeleton's rule).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from repa_probe.analysis.core.inputs import build_analysis_dataset, build_config_encoder, resolve_source
from repa_probe.analysis.core.options import AnalysisOptions
from repa_probe.analysis.core.runner import Analysis, Run, run_analysis
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.generation.fid import (INCEPTION, Extras, dinov2_space, evaluate, fid_vs_step,
                                                inception_space, isc_splits, reference_features, register_encoder)
from repa_probe.analysis.generation.fid_inputs import Reference, image_height, load_images, read_reference, \
    save_reference_stats
from repa_probe.analysis.generation.generate import check_entry, sample_entry, settings_for
from repa_probe.analysis.generation.options import FidOptions, SampleOptions
from repa_probe.encoders.target import load_encoder
from repa_probe.reports.numbers import fmt

log = logging.getLogger("repa_probe")

SETTING_COLUMNS = ("method", "steps", "cfg_scale", "guidance_low", "guidance_high", "seed")
SAMPLE_COLUMNS = ("checkpoint", "run", "step", "folder", "num_samples", "labels", "vae") + SETTING_COLUMNS
CSV_COLUMNS = ("checkpoint", "run", "step", "metric", "value", "num_samples") + SETTING_COLUMNS
REFERENCE_STATS = "reference_stats.pt"
DEFAULT_FID_SAMPLES = 50000


@dataclasses.dataclass
class SamplesEntry:
    """A ``--samples`` folder or ``.npz``, evaluated like a checkpoint (no model: ``take_model()`` is None)."""

    path: Path
    label: str
    run: str | None = None
    info: None = None

    def take_model(self):
        return None

    def describe(self) -> dict:
        return dict(label=self.label, path=str(self.path), run=None, step=None, source_format="samples")


def _folders(run: Run, root: Path) -> dict:
    """Sample folder of each checkpoint: ``root`` for one, ``root/<label>`` (``/`` -> ``_``) for several."""
    entries = [e for e in run.entries if e.info is not None]
    return {e.label: root if len(entries) == 1 else root / e.label.replace("/", "_") for e in entries}


def _settings(run: Run) -> dict:
    """Validated sampler settings of each checkpoint (errors before anything is sampled)."""
    out = {}
    for e in run.entries:
        if e.info is not None:
            out[e.label] = settings_for(e.info.time_convention, run.options)
            check_entry(e, out[e.label])
    return out


# ------------------------------------------------------------------------------------------- sample
class SampleAnalysis(Analysis):
    name, columns = "sample", SAMPLE_COLUMNS

    def setup(self, run: Run) -> None:
        run.options.need_num_samples()
        self.settings, self.folders = _settings(run), _folders(run, run.out)

    def analyse(self, run: Run, entry, model) -> list[dict]:
        s, folder = self.settings[entry.label], self.folders[entry.label]
        sample_entry(entry, model, folder, s, run.dist, run.device, run.options.batch_size, run.options.progress)
        return [dict(checkpoint=entry.label, run=entry.run, step=entry.info.step, num_samples=s.num_samples,
                     folder=str(folder.relative_to(run.out)) if folder != run.out else ".", labels=s.labels,
                     vae=entry.vae_name, **{c: getattr(s, c) for c in SETTING_COLUMNS})]

    def summary(self, run: Run, rows: list[dict]) -> dict:
        return dict(rows=rows)


def sample_checkpoints(ckpts, out_dir, options: SampleOptions) -> dict:
    """Sample every checkpoint of ``ckpts`` (files, run directories) with ``options`` into ``out_dir``; see the
    module docstring. Returns the summary (``rows``: one per sample folder; ``files`` None on torchrun ranks > 0)."""
    return run_analysis(SampleAnalysis(), ckpts, out_dir, options)


# ---------------------------------------------------------------------------------------------- FID
class FidAnalysis(Analysis):
    name, columns, outputs = "fid", CSV_COLUMNS, (REFERENCE_STATS,)

    def load_entries(self, ckpts, options: FidOptions) -> list:
        if bool(ckpts) == bool(options.samples):
            raise AnalysisInputError("give either --ckpt (sample, then evaluate) or --samples (evaluate existing samples)")
        if ckpts:
            return super().load_entries(ckpts, options)
        out = []
        for s in options.samples:
            p = Path(s)
            if not (p.is_dir() or (p.is_file() and p.suffix == ".npz")):
                raise AnalysisInputError(f"--samples {p}: not an image folder or an .npz file")
            out.append(SamplesEntry(p, p.stem if p.suffix == ".npz" else p.name))
        return out

    def setup(self, run: Run) -> None:
        o, ckpts = run.options, [e for e in run.entries if e.info is not None]
        self.reference, own = _reference(ckpts, o.ref)
        if ckpts:
            n = o.num_samples or (len(self.reference.images) if own else DEFAULT_FID_SAMPLES)
            run.options = o = dataclasses.replace(o, num_samples=n)
            self.settings, self.folders = _settings(run), _folders(run, run.out / "samples")
        resolution = ckpts[0].resolution if ckpts else image_height(run.entries[0].path)
        self.spaces = _spaces(ckpts, o, resolution)

    def prepare(self, run: Run) -> None:
        if run.dist.is_main:  # the reference through each extractor once (rank 0 alone evaluates)
            for space in self.spaces:
                reference_features(self.reference, space, run.device, run.options.batch_size)
            save_reference_stats(self.reference, run.out / REFERENCE_STATS)

    def analyse(self, run: Run, entry, model) -> list[dict]:
        o, settings, step = run.options, None, None
        if model is not None:
            settings, step = self.settings[entry.label], entry.info.step
            path = sample_entry(entry, model, self.folders[entry.label], settings, run.dist, run.device,
                                o.batch_size, o.progress)
        else:
            path = entry.path
        if not run.dist.is_main:
            return []
        images = load_images(path)
        reps: dict = {}
        values = evaluate(images, self.reference, self.spaces, run.device, o.batch_size,
                          Extras(o.isc, o.kid, o.prc, o.bootstrap), reps)
        log.info("%s: %s", entry.label, ", ".join(f"{k} {fmt(v)}" for k, v in values.items()))
        s = dataclasses.asdict(settings) if settings else {}
        return [dict(checkpoint=entry.label, run=entry.run, step=step, metric=k, value=v, num_samples=len(images),
                     **{c: s.get(c) for c in SETTING_COLUMNS}, **({"replicates": reps[k]} if k in reps else {}))
                for k, v in values.items()]

    def figures(self, run: Run, rows: list[dict]) -> list[Path]:
        return fid_vs_step(rows, run.out / "figures" / "fid_vs_step", {e.label: e.run for e in run.entries})

    def summary(self, run: Run, rows: list[dict]) -> dict:
        return dict(reference=self.reference.name, metrics=[s.metric for s in self.spaces], rows=rows,
                    isc_splits=isc_splits(rows[0]["num_samples"]) if run.options.isc and rows else None,
                    files=dict(reference_stats=REFERENCE_STATS))


def run_fid(ckpts, out_dir, options: FidOptions) -> dict:
    """Sample and evaluate every checkpoint of ``ckpts`` (or evaluate ``options.samples`` when ``ckpts`` is
    empty / None); see the module docstring. Returns the summary (``files`` None on torchrun ranks > 0)."""
    return run_analysis(FidAnalysis(), ckpts or [], out_dir, options)


def _reference(entries, ref_path) -> tuple[Reference, bool]:
    """``--ref``, else our runs' own dataset (held-out split, through the analysis resolver) as images."""
    if ref_path is not None:
        return read_reference(ref_path), False
    ours = [e for e in entries if e.cfg is not None]
    if not ours:
        raise AnalysisInputError("--ref is required for official checkpoints and for --samples (an ADM reference .npz, "
                       "an image folder or a reference_stats.pt)")
    source = resolve_source(ours, AnalysisOptions(labels="true", vae=ours[0].vae_name))
    ds, split = build_analysis_dataset(source, "auto")
    images = np.stack([ds[i]["image"].permute(1, 2, 0).numpy() for i in range(len(ds))])
    return Reference(f"{source.name}:{split}", images), True


def _spaces(entries, o: FidOptions, resolution: int) -> list:
    """Metrics asked for; with none, FD in our run's target-encoder space (+ Inception FID given weights).
    ``--encoder`` is built for the samples' ``resolution`` (REPA's encoder input size); random init seeded
    with ``--seed`` (the same as the run's target encoder when it is the run's seed)."""
    spaces = [inception_space(o.inception_weights, isc=o.isc)] if o.inception_weights else []
    if o.fd_dinov2:
        spaces.append(dinov2_space(o.dinov2_weights))
    if o.encoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            enc = load_encoder(o.encoder, weights=o.encoder_weights, pretrained=not o.random_encoder,
                               resolution=resolution)
        spaces.append(register_encoder(enc, f"fd_{enc.name}"))
    if not o.fd_dinov2 and not o.encoder:
        ours = [e for e in entries if e.cfg is not None]
        if ours:
            enc = build_config_encoder(ours[0].cfg)
            spaces.append(register_encoder(enc, f"fd_{enc.name}"))
        elif not spaces:
            raise AnalysisInputError("no metric: pass --inception-weights FILE, --fd-dinov2 or --encoder NAME")
    assert not (o.isc or o.kid or o.prc) or any(s.extractor == INCEPTION for s in spaces)  # FidOptions checks
    return spaces

