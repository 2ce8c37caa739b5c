"""Probe throughput: feature extraction (images/s) and linear-probe fitting time.

1. Extraction: :func:`repa_probe.analysis.core.features.extract_features` with every block captured (mean pooling and
   token features), random-initialised models, one timestep:
   - ``tiny``: the default training config's model (SiT-S/4 body, depth 6, width 128) on the built-in
     shapes at 32 px, pixel space (images rendered and prepared as in a probe run);
   - ``SiT-B/2``: on 32x32x4 latents (what a 256 px image becomes through the SD VAE). The VAE itself is
     not timed (no pretrained weights offline): the inputs are random latents in a ModelInputs.
2. Fitting: :func:`repa_probe.analysis.probes.fit_linear_probe` on synthetic Gaussian-blob features (N train,
   N/5 test, D = 768), both backends, default hyper-parameter grids (sklearn: C = 0.001 ... 10 by decades,
   warm-started, + refit, one BLAS thread; torch: 2 lr x 2 weight decays trained together, 30 epochs, + refit). 1000 classes
   is too large for a CPU run; the default class counts are 10 and 100.
3. Segmentation fitting: :func:`repa_probe.analysis.probes.fit_segmentation_probe` with its defaults (at most
   10 epochs, early stopping on 10% held out) on the tiny run's geometry: 2000 / 500 shapes, 8x8 tokens of
   width 128 (the one-hot 8x8 mask plus Gaussian noise: a probe can learn it, but not perfectly), 32x32 masks.

Prints one JSON line per measurement.

    python benchmarks/probe.py                           # CPU defaults: N = 10000, classes 10,100
    python benchmarks/probe.py --device cuda --extract-n 2048 --models tiny,SiT-B/2,SiT-XL/2
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from repa_probe.analysis.core.features import ModelInputs, extract_features, prepare_inputs
from repa_probe.analysis.probes import fit_linear_probe, fit_segmentation_probe
from repa_probe.data import ShapesDataset
from repa_probe.models import create_model
from repa_probe.objectives import FlowMatching


def _model(name: str, device: torch.device):
    torch.manual_seed(0)
    if name == "tiny":
        m = create_model("SiT-S/4", depth=6, hidden_size=128, num_heads=4, input_size=32, in_channels=3,
                         num_classes=4, class_dropout_prob=0.1)
    else:
        m = create_model(name, input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1)
    return m.to(device).eval()


def _inputs(name: str, n: int) -> ModelInputs:
    if name == "tiny":
        return prepare_inputs(ShapesDataset(n, resolution=32, split="val"), None, batch_size=64, progress=False)
    g = torch.Generator().manual_seed(0)
    return ModelInputs(torch.randn(n, 4, 32, 32, generator=g), torch.zeros(n, dtype=torch.long),
                       torch.arange(n), pixel=False)


def bench_extraction(name: str, n: int, batch: int, pool: str, device: torch.device) -> dict:
    model = _model(name, device)
    inputs = _inputs(name, n)
    obj = FlowMatching()
    small = ModelInputs(inputs.data[:batch], inputs.labels[:batch], inputs.indices[:batch], inputs.pixel)
    extract_features(model, obj, small, [0.25], "all", pool=pool, device=device, batch_size=batch, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fs = extract_features(model, obj, inputs, [0.25], "all", pool=pool, device=device, batch_size=batch,
                          progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(bench="extract", model=name, pool=pool, n=n, batch=batch, layers=len(fs.layers),
                tokens=model.num_tokens, width=model.hidden_size, seconds=round(dt, 3),
                images_per_s=round(n / dt, 2), device=str(device))


def bench_fit(backend: str, n: int, dim: int, classes: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * (3.0 / dim ** 0.5)  # pairwise distance ~4 sd: not trivial
    ytr, yte = torch.arange(n) % classes, torch.arange(n // 5) % classes
    xtr = centres[ytr] + torch.randn(n, dim, generator=g)
    xte = centres[yte] + torch.randn(n // 5, dim, generator=g)
    t0 = time.perf_counter()
    res = fit_linear_probe(xtr, ytr, xte, yte, backend=backend, num_classes=classes, device=device)
    dt = time.perf_counter() - t0
    return dict(bench="fit", backend=backend, n_train=n, n_test=n // 5, dim=dim, classes=classes,
                seconds=round(dt, 2), top1=round(res.top1, 4), hparams=res.hparams,
                device=str(device) if backend == "torch" else "cpu")


def bench_seg_fit(n: int, dim: int, noise: float, device: torch.device) -> dict:
    import torch.nn.functional as F

    def split(name: str, size: int, seed: int):
        masks = ShapesDataset(size, resolution=32, split=name).render(range(size))["mask"]      # (N, 32, 32)
        onehot = F.one_hot(masks[:, 2::4, 2::4], 5).float().reshape(size, 64, 5)              # (N, 64, 5)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.cat([onehot, torch.zeros(size, 64, dim - 5)], -1) + noise * torch.randn(size, 64, dim,
                                                                                               generator=g)
        return tokens, masks

    (tx, tm), (vx, vm) = split("train", n, 0), split("val", n // 4, 1)
    t0 = time.perf_counter()
    res = fit_segmentation_probe(tx, tm, vx, vm, 5, device=device)
    dt = time.perf_counter() - t0
    return dict(bench="seg_fit", n_train=n, n_test=n // 4, dim=dim, seconds=round(dt, 2), miou=round(res.miou, 4),
                epochs_run=res.hparams["epochs_run"], best_epoch=res.hparams["best_epoch"], device=str(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    p.add_argument("--models", default="tiny,SiT-B/2", help="extraction models (tiny or registry names)")
    p.add_argument("--extract-n", type=int, default=64, help="images per extraction benchmark (SiT-B/2 gets a "
                   "quarter on CPU)")
    p.add_argument("--extract-batch", type=int, default=16)
    p.add_argument("--num", type=int, default=10000, help="training samples of the fit benchmark")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", default="10,100")
    p.add_argument("--backends", default="sklearn,torch")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--seg-n", type=int, default=2000, help="training images of the segmentation fit benchmark "
                   "(0 = skip it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.skip_extract:
        for name in args.models.split(","):
            n = args.extract_n if (name == "tiny" or device.type == "cuda") else max(args.extract_batch,
                                                                                    args.extract_n // 4)
            for pool in ("mean", "tokens"):
                print(json.dumps(bench_extraction(name, n, args.extract_batch, pool, device)), flush=True)
    if not args.skip_fit:
        for classes in (int(c) for c in args.classes.split(",")):
            for backend in args.backends.split(","):
                print(json.dumps(bench_fit(backend, args.num, args.dim, classes, device)), flush=True)
    if args.seg_n:
        print(json.dumps(bench_seg_fit(args.seg_n, 128, 1.0, device)), flush=True)


if __name__ == "__main__":
    main()
