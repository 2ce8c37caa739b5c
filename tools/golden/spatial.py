"""Golden part "spatial": iREPA's own spatial metrics (``metrics/spatial_metrics.py``) on fixed random tokens.

Writes ``spatial.pt``: ``{"source": ..., "cases": [case, ...]}`` where each case holds ``tokens: (B, T, D)``,
the grid ``H``, ``W``, optional ``masks: (B, T)`` bool, and ``calls``: a list of ``{"metric", "kwargs",
"value": (B,)}``, each ``value`` computed by the official function with those keyword arguments. The cases
cover the defaults, other parameters, zero tokens, tokens with norms between the two epsilons, a non-square
grid, a 3x3 grid (CDS with fewer distances than dmax) and the masks for which SRSS is NaN. Run as part of ``python -m tools.golden ... --irepa PATH``
or alone: ``python -m tools.golden.spatial --irepa PATH --out tests/data/golden``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import torch

from tools.golden.common import commit_of, save_pt

log = logging.getLogger("tools.golden")

FILE = "spatial.pt"


def _official(repo: Path):
    path = Path(repo) / "metrics" / "spatial_metrics.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is --irepa an iREPA checkout?)")
    spec = importlib.util.spec_from_file_location("golden_irepa_spatial_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smooth(gen: torch.Generator, b: int, h: int, w: int, d: int, noise: float) -> torch.Tensor:
    """Tokens ``(b, h*w, d)`` with spatial structure: a bilinearly upsampled coarse field plus noise."""
    coarse = torch.randn(b, d, max(2, h // 4), max(2, w // 4), generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    field = field + noise * torch.randn(b, d, h, w, generator=gen)
    return field.flatten(2).transpose(1, 2).contiguous()


def _blob_masks(gen: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """Rectangular foreground regions ``(b, h*w)`` bool, one per image, of random size and place."""
    out = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        y0, x0 = (int(v) for v in torch.randint(0, h // 2, (2,), generator=gen))
        y1, x1 = y0 + h // 3 + int(torch.randint(0, h // 3, (1,), generator=gen)), x0 + w // 3 + 2
        out[i, y0:y1, x0:x1] = True
    return out.flatten(1)


def _edge_masks(h: int, w: int) -> torch.Tensor:
    """Masks for which SRSS is NaN or special: all FG, one FG token, all BG, isolated FG tokens (no FG
    neighbour: no valid anchor), and a valid half mask."""
    t = h * w
    isolated = torch.zeros(h, w, dtype=torch.bool)
    isolated[::2, ::2] = True
    isolated[1::2, :] = False
    single = torch.zeros(t, dtype=torch.bool)
    single[3] = True
    half = torch.zeros(h, w, dtype=torch.bool)
    half[:, : w // 2] = True
    return torch.stack([torch.ones(t, dtype=torch.bool), single, torch.zeros(t, dtype=torch.bool),
                        isolated.flatten(), half.flatten()])


def _cases(gen: torch.Generator) -> list[dict]:
    base = _smooth(gen, 4, 16, 16, 24, noise=0.5)
    zeros = _smooth(gen, 3, 16, 16, 16, noise=0.3)
    zeros[0, :40] = 0.0                                     # zero tokens: cosine 0 with everything
    zeros[1, ::3] = 0.0
    edge = _smooth(gen, 5, 16, 16, 12, noise=0.4)
    tiny = _smooth(gen, 2, 16, 16, 8, noise=0.5)
    tiny[:, 100:140] *= 1e-10                               # norms below LDS's eps 1e-8, above SRSS's 1e-12
    default = [("lds", {}), ("cds", {}), ("rmsc", {}), ("srss", {})]
    return [
        dict(name="smooth_16x16", tokens=base, H=16, W=16, masks=_blob_masks(gen, 4, 16, 16),
             calls=default + [("lds", {"far_dist": 8}), ("lds", {"far_dist": 3}), ("cds", {"dmax": 4}),
                              ("cds", {"dmax": 12}), ("rmsc", {"sqrt": False}),
                              ("srss", {"d_pos": 2, "d_neg": 8}), ("srss", {"d_pos": 3, "d_pos_min": 2})]),
        dict(name="white_noise_16x16", tokens=torch.randn(2, 256, 32, generator=gen), H=16, W=16,
             masks=_blob_masks(gen, 2, 16, 16), calls=default),
        dict(name="zero_tokens", tokens=zeros, H=16, W=16, masks=_blob_masks(gen, 3, 16, 16), calls=default),
        dict(name="nonsquare_8x12", tokens=_smooth(gen, 3, 8, 12, 20, noise=0.5), H=8, W=12,
             masks=_blob_masks(gen, 3, 8, 12), calls=default + [("lds", {"far_dist": 10})]),
        dict(name="grid_3x3", tokens=_smooth(gen, 3, 3, 3, 8, noise=0.5), H=3, W=3, masks=None,
             calls=[("cds", {}), ("lds", {"far_dist": 4}), ("rmsc", {})]),
        dict(name="srss_edge_masks", tokens=edge, H=16, W=16, masks=_edge_masks(16, 16),
             calls=[("srss", {}), ("srss", {"d_pos": 2})]),
        dict(name="tiny_norm_tokens", tokens=tiny, H=16, W=16, masks=_blob_masks(gen, 2, 16, 16), calls=default),
    ]


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Run iREPA's metric functions on :func:`_cases` and write ``out_dir/spatial.pt`` ([] without --irepa)."""
    if repos.get("irepa") is None:
        log.warning("golden part 'spatial' skipped: no iREPA checkout given (--irepa PATH)")
        return []
    official = _official(Path(repos["irepa"]))
    cases = _cases(torch.Generator().manual_seed(1234))
    for case in cases:
        records = []
        for metric, kwargs in case["calls"]:
            fn = official.METRICS_REGISTRY[metric]
            value = fn(case["tokens"], case["H"], case["W"], masks=case["masks"], **kwargs)
            records.append({"metric": metric, "kwargs": dict(kwargs), "value": value.float().clone()})
        case["calls"] = records
        if case["masks"] is None:
            del case["masks"]
    record = {"source": f"End2End-Diffusion/iREPA metrics/spatial_metrics.py @ {commit_of(Path(repos['irepa']), commits, 'irepa')}",
              "cases": cases}
    return [save_pt(record, Path(out_dir) / FILE)]


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tools.golden.spatial", description=__doc__.splitlines()[0])
    p.add_argument("--irepa", required=True, type=Path, help="iREPA checkout (End2End-Diffusion/iREPA)")
    p.add_argument("--out", default=Path("tests/data/golden"), type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print("\n".join(str(q) for q in write(args.out, {"irepa": args.irepa})) or "nothing written", file=sys.stderr)
