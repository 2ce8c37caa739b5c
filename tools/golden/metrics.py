"""Golden part "metrics": platonic-rep's alignment metrics on fixed random features.

Writes ``metrics_features.pt`` (per case: raw ``{case}/a, {case}/b: (N, D)`` float64 features and, per
preparation, the prepared features ``{case}/{prep}/a|b``) and ``metrics.json``: per case and preparation,
``AlignmentMetrics.{cknna (k = 5, 10; and unbiased=False at k = 10), cka, unbiased_cka, mutual_knn,
cycle_knn (k = 5, 10)}`` computed by their ``metrics.py`` on the prepared features, plus the clamp threshold
of ``remove_outliers``. Preparations: ``l2`` (row L2 normalisation), ``clip+l2`` (``remove_outliers(q=0.95,
exact=False)`` then l2, as ``measure_alignment.py``) and ``clipexact+l2`` (``exact=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.golden.common import import_file, need, save_json, save_pt, stub_modules

#: name -> (n, d_a, d_b, kind, noise, offset, seed)
CASES = {
    "correlated": (120, 24, 16, "gaussian", 0.8, 0.3, 0),
    "independent": (100, 20, 12, "gaussian", None, 0.0, 1),
    "heavy_tailed": (90, 16, 24, "student_t", 0.5, 1.0, 2),
}
PREPS = ("l2", "clip+l2", "clipexact+l2")
KNN_K = (5, 10)


def platonic_metrics(repo: Path):
    """Their ``metrics`` module (torchaudio, used only by edit_distance_knn, is stubbed when missing)."""
    with stub_modules("torchaudio", "torchaudio.functional"):
        return import_file("golden_platonic_metrics", Path(repo) / "metrics.py")


def features(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw float64 features ``a: (n, d_a)``, ``b: (n, d_b)`` of ``case`` (b a noisy linear map of a, or independent)."""
    n, da, db, kind, noise, offset, seed = CASES[case]
    rng = np.random.default_rng(seed)
    a = rng.standard_t(3.0, size=(n, da)) if kind == "student_t" else rng.standard_normal((n, da))
    if noise is None:
        b = rng.standard_normal((n, db))
    else:
        b = a @ (rng.standard_normal((da, db)) / np.sqrt(da)) + noise * rng.standard_normal((n, db))
    return torch.from_numpy(a + offset), torch.from_numpy(b + offset)


def prepare(metrics_mod, x: torch.Tensor, prep: str) -> tuple[torch.Tensor, float | None]:
    """Their feature preparation: optional ``remove_outliers(q=0.95)``, then row L2; also the clamp value."""
    clamp = None
    if prep != "l2":
        clipped = metrics_mod.remove_outliers(x, q=0.95, exact=prep == "clipexact+l2")
        clamp = float(clipped.abs().max())
        x = clipped
    return F.normalize(x, p=2, dim=-1), clamp


def values(metrics_mod, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Every metric of their ``AlignmentMetrics`` that the project reimplements, on prepared features."""
    am = metrics_mod.AlignmentMetrics
    out = {"cka": am.cka(a, b), "unbiased_cka": am.unbiased_cka(a, b),
           "cknna_biased_k10": am.cknna(a, b, topk=10, unbiased=False)}
    for k in KNN_K:
        out[f"cknna_k{k}"] = am.cknna(a, b, topk=k)
        out[f"mutual_knn_k{k}"] = am.mutual_knn(a, b, topk=k)
        out[f"cycle_knn_k{k}"] = am.cycle_knn(a, b, topk=k)
    return {k: float(v) for k, v in out.items()}


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Write ``metrics_features.pt`` and ``metrics.json``."""
    if not need(repos, "platonic", part="metrics"):
        return []
    mod = platonic_metrics(repos["platonic"])
    tensors, table = {}, {}
    for case in CASES:
        a, b = features(case)
        tensors[f"{case}/a"], tensors[f"{case}/b"] = a, b
        for prep in PREPS:
            (pa, clamp_a), (pb, clamp_b) = prepare(mod, a, prep), prepare(mod, b, prep)
            tensors[f"{case}/{prep}/a"], tensors[f"{case}/{prep}/b"] = pa, pb
            table[f"{case}/{prep}"] = {**values(mod, pa, pb), "clamp_a": clamp_a, "clamp_b": clamp_b}
    out_dir = Path(out_dir)
    return [save_pt(tensors, out_dir / "metrics_features.pt"), save_json(table, out_dir / "metrics.json")]
