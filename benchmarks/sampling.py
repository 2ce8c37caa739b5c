"""Benchmark sampling (images/s) and FD feature extraction, each against a baseline run in the same process.

Sampling: a random SiT-B/2 (256-px latents 4×32×32) on the CPU, a few steps, our ``repa_probe.sampling.sample``
against REPA's own ``samplers.py`` loop (``--repa DIR``, default /work/official/REPA; without it, a plain
per-step float32 Euler loop written here). Both call the same network, so the ratio measures the sampler
overhead only. FD features: ``repa_probe.analysis.generation.fid.extract`` (torch-fidelity's DataLoader path) against a
direct ``encoder.cls`` loop on the same uint8 images.

  python benchmarks/sampling.py                       # SiT-B/2, euler 4 steps + SDE 4 steps with CFG, batch 8
  python benchmarks/sampling.py --model SiT-XL/2 --steps 250 --method sde --cfg-scale 1.8 --device cuda --bf16
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from repa_probe.analysis.generation.fid import extract, register_encoder
from repa_probe.encoders.target import load_encoder
from repa_probe.models import create_model
from repa_probe.sampling import sample


def plain_euler(model, z, y, steps):
    """Baseline without float64 state or guidance logic: x <- x + dt v in the model dtype."""
    ts = torch.linspace(1, 0, steps + 1)
    x = z
    with torch.no_grad():
        for i in range(steps):
            v = model(x, ts[i].expand(x.shape[0]).to(x.device), y)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def _timed(fn, repeats, device):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench_sampling(args, device):
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    z = torch.randn(args.batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    samplers = None
    if args.repa and Path(args.repa, "samplers.py").exists():
        sys.path.insert(0, str(args.repa))
        samplers = importlib.import_module("samplers")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    kw = dict(num_steps=args.steps, cfg_scale=args.cfg_scale, guidance_low=0.0, guidance_high=args.guidance_high)
    if samplers is not None:
        fn = samplers.euler_maruyama_sampler if args.method == "sde" else samplers.euler_sampler
        base_name, base = "REPA samplers.py", lambda: fn(model, z, y, heun=args.method == "heun", **kw)
    else:
        base_name, base = "plain float32 Euler loop", lambda: plain_euler(model, z, y, args.steps)
    ours = lambda: sample(model, z, y, method=args.method, steps=args.steps, cfg_scale=args.cfg_scale,  # noqa: E731
                          guidance_interval=(0.0, args.guidance_high))
    with autocast:
        _timed(ours, 1, device)  # warm-up
        t_base, t_ours = _timed(base, args.repeats, device), _timed(ours, args.repeats, device)
    print(f"sampling {args.model} {args.method} {args.steps} steps cfg {args.cfg_scale} batch {args.batch} "
          f"on {device}{' bf16' if args.bf16 else ''}:")
    print(f"  ours {args.batch / t_ours:.3f} img/s | {base_name} {args.batch / t_base:.3f} img/s | "
          f"ratio {t_base / t_ours:.2f}x")


def bench_features(args, device):
    torch.manual_seed(0)
    enc = load_encoder(args.encoder, pretrained=False, resolution=256).to(device)
    space = register_encoder(enc, f"fd_{enc.name}")
    images = np.random.default_rng(0).integers(0, 256, (args.fd_images, 256, 256, 3), dtype=np.uint8)

    def direct():
        with torch.no_grad():
            for s in range(0, len(images), 64):
                enc.cls(torch.from_numpy(images[s:s + 64]).permute(0, 3, 1, 2).to(device))

    t_ours = _timed(lambda: extract(images, space, ["cls"], device, 64), args.repeats, device)
    t_base = _timed(direct, args.repeats, device)
    print(f"FD features {args.encoder} (random init), {args.fd_images} images 256 px on {device}:")
    print(f"  ours (torch-fidelity path) {len(images) / t_ours:.1f} img/s | direct loop {len(images) / t_base:.1f} "
          f"img/s | ratio {t_base / t_ours:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--method", default="euler", choices=("euler", "heun", "sde"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repa", default="/work/official/REPA", help="REPA work tree for the baseline loop")
    p.add_argument("--encoder", default="dinov2_vitb14")
    p.add_argument("--fd-images", type=int, default=64)
    p.add_argument("--skip-features", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    bench_sampling(args, device)
    if not args.skip_features:
        bench_features(args, device)


if __name__ == "__main__":
    main()
