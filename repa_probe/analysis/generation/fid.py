"""FID and friends through torch-fidelity: Inception FID / IS / KID / precision-recall, FD_DINOv2 and FD in the
space of any target encoder of the project (registered as a torch-fidelity feature extractor).

Each metric is named for its feature space (``fid_inception``, ``fd_dinov2_vitl14``, ``fd_<encoder>``), so a
random-initialised test extractor can never be reported as FID. Features go through torch-fidelity's own
extraction (``create_feature_extractor`` / ``get_featuresdict_from_dataset``); Fréchet distances are
computed in float64 (:mod:`repa_probe.analysis.metrics.frechet`, torch-fidelity's formula). References: an ADM
reference batch (``mu``/``sigma`` read from the ``.npz``; its ``arr_0`` only for KID and precision/recall),
an image folder or ``.npz`` of images, or statistics cached by an earlier run (``reference_stats.pt``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repa_probe.analysis.core.inputs import DataSource, build_analysis_dataset, build_config_encoder
from repa_probe.analysis.core.plots import save_figure
from repa_probe.analysis.core.runner import versions
from repa_probe.analysis.core.writers import write_csv, write_json
from repa_probe.analysis.generation import generate
from repa_probe.analysis.generation.fid_inputs import (  # noqa: F401 (re-exported: part of this module's API)
    AnalysisInputError, ImageArray, Reference, check_layout, image_height, load_images, read_reference,
    save_reference_stats)
from repa_probe.analysis.metrics.frechet import fd_replicates, frechet_distance, statistics
from repa_probe.devices import resolve_device
from repa_probe.encoders.target import load_encoder
from repa_probe.reports.bootstrap import FILE, take_replicates, write_replicates
from repa_probe.reports.run_report import write_run_report
from repa_probe.reports.numbers import fmt

log = logging.getLogger("repa_probe")

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DGM_ENCODER, DGM_SIZE = "dinov2_vitl14", 224


# --------------------------------------------------------------------------------- feature extractors
@dataclasses.dataclass
class FeatureSpace:
    """A metric's feature space: torch-fidelity extractor name, its feature layer and constructor kwargs."""

    metric: str
    extractor: str
    layer: str
    kwargs: dict = dataclasses.field(default_factory=dict)


_REGISTERED: dict[int, str] = {}


def register_encoder(encoder, metric: str, resize: int | None = None) -> FeatureSpace:
    """Register ``encoder`` (a TargetEncoder) as a torch-fidelity feature extractor of CLS tokens ``(B, D)``.

    ``resize``: first resize to this size with antialiased bicubic (dgm-eval's FD_DINOv2 preprocessing);
    otherwise the encoder's own (REPA's) preprocessing applies. Returns the FeatureSpace of ``metric``.
    """
    import torch_fidelity

    key = id(encoder) * 1000 + (resize or 0)
    if key not in _REGISTERED:
        name = f"repa-probe-{metric}-{len(_REGISTERED)}"

        class EncoderExtractor(torch_fidelity.FeatureExtractorBase):
            def __init__(self, name, features_list, **kwargs):
                super().__init__(name, features_list)
                self.encoder = encoder

            @staticmethod
            def get_provided_features_list():
                return ("cls",)

            @staticmethod
            def get_default_feature_layer_for_metric(metric):
                return "cls"

            @staticmethod
            def can_be_compiled():
                return False

            @staticmethod
            def get_dummy_input_for_compile():
                return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

            def forward(self, x):
                if resize is not None and x.shape[-2:] != (resize, resize):
                    x = F.interpolate(x.float(), size=(resize, resize), mode="bicubic", align_corners=False,
                                      antialias=True).clamp(0, 255)
                return (self.encoder.cls(x).float(),)

        torch_fidelity.register_feature_extractor(name, EncoderExtractor)
        _REGISTERED[key] = name
    return FeatureSpace(metric, _REGISTERED[key], "cls")


def inception_space(weights) -> FeatureSpace:
    """torch-fidelity's Inception (ADM-compatible) with a local weights file (``--inception-weights``)."""
    path = Path(os.path.expanduser(str(weights))) if weights else (
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not path.is_file():
        raise AnalysisInputError(f"Inception weights {path} not found: pass --inception-weights FILE ({INCEPTION_FILE})")
    return FeatureSpace("fid_inception", INCEPTION, "2048", {"feature_extractor_weights_path": str(path)})


def dinov2_space(weights=None) -> FeatureSpace:
    """FD_DINOv2 as dgm-eval: DINOv2 ViT-L/14 CLS at 224 px (antialiased bicubic), ImageNet normalisation."""
    enc = load_encoder(DGM_ENCODER, weights=weights, pretrained=True, resolution=256)
    return register_encoder(enc, f"fd_{DGM_ENCODER}", resize=DGM_SIZE)


def extract(images: np.ndarray, space: FeatureSpace, layers, device, batch_size: int = 64) -> dict:
    """Features ``{layer: (N, D) float tensor}`` of uint8 ``images`` through torch-fidelity."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    fe = create_feature_extractor(space.extractor, list(layers), cuda=cuda, verbose=False, **space.kwargs)
    return get_featuresdict_from_dataset(ImageArray(images), fe, batch_size, cuda, True, False)


# -------------------------------------------------------------------------------------------- metrics
def reference_stats(ref: Reference, space: FeatureSpace, device, batch_size: int) -> dict:
    """``{"mu", "sigma", "n"}`` of the reference in ``space`` (read, or computed once and kept in ``ref``)."""
    if space.metric not in ref.stats:
        if ref.images is None:
            raise AnalysisInputError(f"--ref {ref.name} has no images and no {space.metric} statistics")
        mu, sigma = statistics(extract(ref.images, space, [space.layer], device, batch_size)[space.layer])
        ref.stats[space.metric] = {"mu": mu, "sigma": sigma, "n": len(ref.images)}
    return ref.stats[space.metric]


def evaluate(samples: np.ndarray, ref: Reference, spaces, device="cpu", batch_size: int = 64,
             isc: bool = False, kid: bool = False, prc: bool = False, bootstrap: int = 0,
             replicates: dict | None = None) -> dict[str, float]:
    """Metrics of uint8 ``samples (N, H, W, 3)`` against ``ref`` in every FeatureSpace of ``spaces``; with
    the Inception space also IS (ADM: 10 contiguous splits, no shuffle), KID and precision/recall (k = 3,
    Inception pool3 features; they need reference images). With ``bootstrap`` > 0, ``replicates`` (a dict)
    receives each Fréchet distance's replicates over the samples
    (:func:`~repa_probe.analysis.metrics.frechet.fd_replicates`)."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    out = {}
    for space in spaces:
        inception = space.extractor == INCEPTION
        layers = [space.layer] + (["logits_unbiased"] if inception and isc else [])
        feats = extract(samples, space, layers, device, batch_size)
        r = reference_stats(ref, space, device, batch_size)
        mu, sigma = statistics(feats[space.layer])
        out[space.metric] = frechet_distance(mu, sigma, r["mu"], r["sigma"])
        if bootstrap and replicates is not None:
            replicates[space.metric] = fd_replicates(feats[space.layer], r["mu"], r["sigma"], bootstrap)
        if not inception:
            continue
        if isc:
            m = isc_featuresdict_to_metric(feats, "logits_unbiased", samples_shuffle=False, verbose=False)
            out["inception_score"] = m["inception_score_mean"]
        if kid or prc:
            if ref.images is None:
                raise AnalysisInputError(f"--ref {ref.name}: KID and precision/recall need reference images (arr_0)")
            ref_feats = extract(ref.images, space, [space.layer], device, batch_size)
            if kid:
                n = min(len(samples), len(ref.images), 1000)
                m = kid_featuresdict_to_metric(feats, ref_feats, space.layer, kid_subset_size=n, verbose=False)
                out["kid_inception"] = m["kernel_inception_distance_mean"]
            if prc:
                m = prc_featuresdict_to_metric(feats, ref_feats, space.layer, verbose=False)
                out["precision_inception"], out["recall_inception"] = m["precision"], m["recall"]
    return out


# ------------------------------------------------------------------------------------------ run level
SETTING_COLUMNS = ("method", "steps", "cfg_scale", "guidance_low", "guidance_high", "seed")
CSV_COLUMNS = ("checkpoint", "run", "step", "metric", "value", "num_samples") + SETTING_COLUMNS


def _run_reference(entries, ref_path):
    """``--ref``, else our run's own dataset (held-out split) as reference images (thin use of the resolver)."""
    if ref_path is not None:
        return read_reference(ref_path), False
    ours = [e for e in entries if e.cfg is not None]
    if not ours:
        raise AnalysisInputError("--ref is required for official checkpoints and for --samples (an ADM reference .npz, "
                       "an image folder or a reference_stats.pt)")
    c = ours[0].cfg
    source = DataSource(c.data.name, c.data.root, ours[0].resolution, c.run.seed,
                        c.data.num_classes if c.data.name == "shapes" else None, ours[0].vae_name, None, True)
    ds, split = build_analysis_dataset(source, "auto")
    images = np.stack([ds[i]["image"].permute(1, 2, 0).numpy() for i in range(len(ds))])
    return Reference(f"{c.data.name}:{split}", images), True


def _spaces(entries, inception_weights, fd_dinov2, dinov2_weights, encoder, encoder_weights, random_encoder,
            resolution: int, seed: int):
    """Metrics asked for; with none, FD in our run's target-encoder space (+ Inception FID given weights).
    ``--encoder`` is built for the samples' ``resolution`` (REPA's encoder input size); random init seeded
    with ``seed`` (the same as the run's target encoder when it is the run's seed)."""
    spaces = [inception_space(inception_weights)] if inception_weights else []
    if fd_dinov2:
        spaces.append(dinov2_space(dinov2_weights))
    if encoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = load_encoder(encoder, weights=encoder_weights, pretrained=not random_encoder, resolution=resolution)
        spaces.append(register_encoder(enc, f"fd_{enc.name}"))
    if not fd_dinov2 and not encoder:
        ours = [e for e in entries if e.cfg is not None]
        if ours:
            enc = build_config_encoder(ours[0].cfg)
            spaces.append(register_encoder(enc, f"fd_{enc.name}"))
        elif not spaces:
            raise AnalysisInputError("no metric: pass --inception-weights FILE, --fd-dinov2 or --encoder NAME")
    return spaces


def run_fid(out_dir, ckpts=None, samples=None, ref=None, inception_weights=None, fd_dinov2=False,
            dinov2_weights=None, encoder=None, encoder_weights=None, random_encoder=False, isc=False, kid=False,
            prc=False, num_samples=None, batch_size=64, device="auto", progress=True, bootstrap=0, **sampler) -> dict:
    """Sample every checkpoint of ``ckpts`` (or take the folders / ``.npz`` of ``samples``) and evaluate them:
    ``out_dir/fid.csv``, ``summary.json``, ``reference_stats.pt``, ``figures/fid_vs_step.{pdf,png}`` and
    ``report.md``; with ``bootstrap`` > 0 also each Fréchet distance's replicates over the samples
    (``replicates.npz``, for the intervals of a study report)."""
    if (ckpts is None) == (samples is None):
        raise AnalysisInputError("give either --ckpt (sample, then evaluate) or --samples (evaluate existing samples)")
    dev = resolve_device(device)
    out = Path(out_dir)
    entries = generate.load_checkpoints(ckpts, sampler.pop("weights", "auto"), sampler.pop("time_convention", None),
                                        sampler.pop("encoder_depth", None), sampler.pop("vae", None)) if ckpts else []
    reference, own_data = _run_reference(entries, ref)
    resolution = entries[0].resolution if entries else image_height(samples[0])
    spaces = _spaces(entries, inception_weights, fd_dinov2, dinov2_weights, encoder, encoder_weights, random_encoder,
                     resolution, int(sampler.get("seed", 0)))
    if isc or kid or prc:
        if not any(s.extractor == INCEPTION for s in spaces):
            raise AnalysisInputError("--isc/--kid/--prc use Inception features: pass --inception-weights FILE")
    if ckpts:
        n = num_samples or (len(reference.images) if own_data else 50000)
        folders = generate.sample_checkpoints(None, out / "samples", num_samples=n, batch_size=batch_size,
                                              device=dev, progress=progress, entries=entries, **sampler)
        jobs = [(f.entry.label, f.entry.run, f.entry.info.step, f.folder / generate.NPZ_FILE, f.settings)
                for f in folders]
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 alone evaluates and writes
            return dict(rows=[], files=None)
    else:
        jobs = [(Path(s).stem if Path(s).suffix == ".npz" else Path(s).name, None, None, Path(s), None)
                for s in samples]
    rows = []
    for label, run, step, path, settings in jobs:
        images = load_images(path)
        reps: dict = {}
        values = evaluate(images, reference, spaces, dev, batch_size, isc, kid, prc, bootstrap, reps)
        s = dataclasses.asdict(settings) if settings else {}
        rows += [dict(checkpoint=label, run=run, step=step, metric=k, value=v, num_samples=len(images), **{
            c: s.get(c) for c in SETTING_COLUMNS}, **({"replicates": reps[k]} if k in reps else {}))
            for k, v in values.items()]
        log.info("%s: %s", label, ", ".join(f"{k} {fmt(v)}" for k, v in values.items()))
    return _write_outputs(out, rows, reference, spaces)


def _write_outputs(out: Path, rows: list, reference: Reference, spaces) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    replicates = take_replicates(rows)
    write_replicates(replicates, out / FILE)
    save_reference_stats(reference, out / "reference_stats.pt")
    write_csv(rows, out / "fid.csv", CSV_COLUMNS)
    figures = [str(p) for p in fid_vs_step(rows, out / "figures" / "fid_vs_step")]
    summary = dict(reference=reference.name, metrics=[s.metric for s in spaces], rows=rows,
                   files=dict(csv=str(out / "fid.csv"), figures=figures, reference_stats=str(out / "reference_stats.pt")),
                   versions=versions())
    write_json(summary, out / "summary.json")
    write_run_report(out, "fid", rows, replicates, summary, [out / "fid.csv", out / "summary.json", out / FILE,
                                                             *map(Path, figures)])
    return summary


def fid_vs_step(rows: list, stem: Path, runs: dict | None = None) -> list[Path]:
    """One panel per metric: value against training step, one line per run (PDF + PNG); [] without steps.
    The run of a row: ``runs[checkpoint]`` (label -> run), else its ``run`` column, else the checkpoint."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("step") is not None]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    if not metrics:
        return []
    fig = Figure(figsize=(4.5 * len(metrics), 3.5))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        lines: dict = {}
        for r in (r for r in rows if r["metric"] == metric):
            run = (runs or {}).get(r["checkpoint"]) or r.get("run") or r["checkpoint"]
            lines.setdefault(run, []).append((r["step"], r["value"]))
        for run, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    return save_figure(fig, stem)
