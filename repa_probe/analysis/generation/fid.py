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
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.generation.fid_inputs import (  # noqa: F401 (re-exported: part of this module's API)
    ImageArray, Reference, check_layout, image_height, load_images, read_reference, save_reference_stats)
from repa_probe.analysis.metrics.frechet import fd_replicates, frechet_distance, statistics

log = logging.getLogger("repa_probe")

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DGM_ENCODER, DGM_SIZE = "dinov2_vitl14", 224
ADM_SPLIT_SIZE = 5000  # ADM's evaluator: Inception Score over splits of 5000 samples


# --------------------------------------------------------------------------------- feature extractors
@dataclasses.dataclass
class FeatureSpace:
    """A metric's feature space: torch-fidelity extractor name, its feature layer, the layers extracted
    (``layers``: the feature layer, plus Inception's ``logits_unbiased`` for IS) and constructor kwargs. The
    extractor is built (its weights loaded) once per space and device, by :meth:`extractor_on`."""

    metric: str
    extractor: str
    layer: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    layers: tuple = ()
    _built: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers) or (self.layer,)

    def extractor_on(self, device):
        """The torch-fidelity feature extractor of this space on ``device`` (built on first use)."""
        from torch_fidelity.utils import create_feature_extractor

        cuda = torch.device(device).type == "cuda"
        if cuda not in self._built:
            self._built[cuda] = create_feature_extractor(self.extractor, list(self.layers), cuda=cuda, verbose=False,
                                                         **self.kwargs)
        return self._built[cuda]


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


def inception_space(weights, isc: bool = False) -> FeatureSpace:
    """torch-fidelity's Inception (ADM-compatible) with a local weights file (``--inception-weights``; with
    ``isc`` also its ``logits_unbiased``). The file is checked here, before any sampling: a state dict of
    tensors (read with ``weights_only=True``) that loads into torch-fidelity's InceptionV3, keys and shapes."""
    from repa_probe.checkpoint import CheckpointError, safe_load

    path = Path(os.path.expanduser(str(weights))) if weights else (
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not path.is_file():
        raise AnalysisInputError(f"Inception weights {path} not found: pass --inception-weights FILE ({INCEPTION_FILE})")
    try:
        state = safe_load(path)
    except CheckpointError:
        raise AnalysisInputError(f"--inception-weights {path}: not a PyTorch weights file (expected torch-fidelity's "
                       f"{INCEPTION_FILE})") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise AnalysisInputError(f"--inception-weights {path}: not a state dict of tensors (expected torch-fidelity's "
                       f"{INCEPTION_FILE})")
    del state
    space = FeatureSpace("fid_inception", INCEPTION, "2048", {"feature_extractor_weights_path": str(path)},
                         ("2048", "logits_unbiased") if isc else ("2048",))
    try:
        space.extractor_on("cpu")
    except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict: missing / unexpected keys, shapes
        reason = str(exc).strip().splitlines()
        raise AnalysisInputError(f"--inception-weights {path}: does not fit torch-fidelity's InceptionV3 "
                       f"({(reason[1] if len(reason) > 1 else reason[0]).strip()[:160]})") from None
    return space


def dinov2_space(weights=None) -> FeatureSpace:
    """FD_DINOv2 as dgm-eval: DINOv2 ViT-L/14 CLS at 224 px (antialiased bicubic), ImageNet normalisation."""
    from repa_probe.encoders.target import load_encoder

    enc = load_encoder(DGM_ENCODER, weights=weights, pretrained=True, resolution=256)
    return register_encoder(enc, f"fd_{DGM_ENCODER}", resize=DGM_SIZE)


def extract(images: np.ndarray, space: FeatureSpace, device, batch_size: int = 64) -> dict:
    """Features ``{layer: (N, D) float tensor}`` (every layer of ``space.layers``) of uint8 ``images``
    ``(N, H, W, 3)`` through torch-fidelity, with the space's extractor (built once)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    return get_featuresdict_from_dataset(ImageArray(images), space.extractor_on(device), batch_size, cuda, True, False)


def isc_splits(num_samples: int) -> int:
    """ADM's Inception Score splits: one per 5000 samples, ``ceil(N / 5000)`` (10 at N = 50 000)."""
    return max(1, math.ceil(num_samples / ADM_SPLIT_SIZE))


# -------------------------------------------------------------------------------------------- metrics
def reference_features(ref: Reference, space: FeatureSpace, device, batch_size: int) -> dict:
    """``{"mu", "sigma", "n"}`` of the reference in ``space`` (read, or computed once and kept in ``ref``);
    the reference's features themselves are kept too (``ref.features``: KID and precision/recall), so its
    images go through each extractor once per run."""
    if space.metric not in ref.stats or (ref.images is not None and space.metric not in ref.features):
        if ref.images is None:
            raise AnalysisInputError(f"--ref {ref.name} has no images and no {space.metric} statistics")
        feats = extract(ref.images, space, device, batch_size)[space.layer]
        ref.features[space.metric] = feats
        if space.metric not in ref.stats:
            mu, sigma = statistics(feats)
            ref.stats[space.metric] = {"mu": mu, "sigma": sigma, "n": len(ref.images)}
    return ref.stats[space.metric]


@dataclasses.dataclass(frozen=True)
class Extras:
    """What :func:`evaluate` computes besides the Fréchet distances: ``isc``, ``kid``, ``prc`` (Inception space
    only) and ``bootstrap`` replicates of each distance (0 = off)."""

    isc: bool = False
    kid: bool = False
    prc: bool = False
    bootstrap: int = 0


def evaluate(samples: np.ndarray, ref: Reference, spaces, device="cpu", batch_size: int = 64,
             extras: Extras = Extras(), replicates: dict | None = None) -> dict[str, float]:
    """Metrics of uint8 ``samples (N, H, W, 3)`` against ``ref`` in every FeatureSpace of ``spaces``; with
    the Inception space also (``extras``) IS (ADM: ``ceil(N / 5000)`` contiguous splits, no shuffle; the space
    must carry ``logits_unbiased``), KID and precision/recall (k = 3, Inception pool3 features; they need
    reference images, whose features are computed once, :func:`reference_features`). With
    ``extras.bootstrap`` > 0, ``replicates`` (a dict) receives each Fréchet distance's replicates over the
    samples (:func:`~repa_probe.analysis.metrics.frechet.fd_replicates`)."""
    isc, kid, prc, bootstrap = extras.isc, extras.kid, extras.prc, extras.bootstrap
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    out = {}
    for space in spaces:
        feats = extract(samples, space, device, batch_size)
        r = reference_features(ref, space, device, batch_size)
        mu, sigma = statistics(feats[space.layer])
        out[space.metric] = frechet_distance(mu, sigma, r["mu"], r["sigma"])
        if bootstrap and replicates is not None:
            replicates[space.metric] = fd_replicates(feats[space.layer], r["mu"], r["sigma"], bootstrap)
        if space.extractor != INCEPTION:
            continue
        if isc:
            m = isc_featuresdict_to_metric(feats, "logits_unbiased", isc_splits=isc_splits(len(samples)),
                                           samples_shuffle=False, verbose=False)
            out["inception_score"] = m["inception_score_mean"]
        if kid or prc:
            if ref.images is None:
                raise AnalysisInputError(f"--ref {ref.name}: KID and precision/recall need reference images (arr_0)")
            ref_feats = {space.layer: ref.features[space.metric]}
            if kid:
                n = min(len(samples), len(ref.images), 1000)
                m = kid_featuresdict_to_metric(feats, ref_feats, space.layer, kid_subset_size=n, verbose=False)
                out["kid_inception"] = m["kernel_inception_distance_mean"]
            if prc:
                m = prc_featuresdict_to_metric(feats, ref_feats, space.layer, verbose=False)
                out["precision_inception"], out["recall_inception"] = m["precision"], m["recall"]
    return out


# --------------------------------------------------------------------------------------------- figure
def fid_vs_step(rows: list, stem: Path, runs: dict | None = None) -> list[Path]:
    """One panel per metric: value against training step, one line per run (PDF + PNG); [] without steps.
    The run of a row: ``runs[checkpoint]`` (label -> run), else its ``run`` column, else the checkpoint."""
    from matplotlib.figure import Figure

    from repa_probe.analysis.core.plots import save_figure

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
