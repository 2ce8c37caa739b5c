"""Benchmark the spatial metrics: ``repa_probe.analysis.metrics.spatial.spatial_metrics`` (LDS, CDS, SRSS, RMSC together,
one Gram per chunk of images) against a naive baseline, on N images × 256 tokens (16×16) × D = 1152 float32.

Tokens: a bilinearly upsampled 4×4 random field plus noise (so the metrics are not ~0), generated batch by batch
(``--batch`` images; generation is not timed): N × 256 × 1152 float32 would be 11.8 GB for N = 10 000, so
features are streamed as the alignment analysis does. SRSS masks: a random rectangle per image.

naive (written here from the definitions): per metric its own (B, T, T) Gram of the whole batch, boolean
indexing of the Gram per distance, a Python loop over the images for SRSS (the direct transcription).

Every method runs in a fresh subprocess; memory = peak RSS (``ru_maxrss``) during the metric calls minus the
RSS after the first input batch was made (CPU) or ``max_memory_allocated`` minus the input (GPU), i.e. what the
metrics need beyond their input. The naive baseline runs on ``--naive-n`` images (one batch) and its time is
extrapolated linearly to N (its cost per image is constant); its memory at batch N is estimated from the
(B, T, T) buffers it holds.

  python benchmarks/spatial.py                            # N = 10 000 (ours), naive on 500
  python benchmarks/spatial.py --n 2000 --naive-n 250     # smaller, on a loaded CPU
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from repa_probe.analysis.metrics.spatial import spatial_metrics

H = W = 16
T, D = H * W, 1152


def make_batch(out: torch.Tensor, masks: torch.Tensor, seed: int) -> None:
    """Fill ``out: (b, T, D)`` float32 and ``masks: (b, T)`` bool in place, one image at a time (so making the
    input needs no memory beyond it), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    masks.zero_()
    for i in range(out.shape[0]):  # benchmark input only
        coarse = torch.randn(1, D, 4, 4, generator=g)
        x = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
        x = x + 0.5 * torch.randn(1, D, H, W, generator=g)
        out[i].copy_(x.flatten(2)[0].T)
        y0, x0 = (int(v) for v in torch.randint(0, 8, (2,), generator=g))
        masks[i].view(H, W)[y0:y0 + 7, x0:x0 + 8] = True


def naive(x: torch.Tensor, masks: torch.Tensor) -> dict:
    """The definitions transcribed: one full Gram per metric, masks over distances, a loop for SRSS."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    c = torch.stack([yy.flatten(), xx.flatten()], 1).to(x.device)
    dist = (c[:, None] - c[None]).abs().sum(-1)
    gram = lambda: (lambda u: u @ u.transpose(1, 2))(F.normalize(x.float(), dim=-1, eps=1e-8))
    g = gram()
    lds = g[:, dist == 1].mean(1) - g[:, dist >= 6].mean(1)
    g = gram()
    ys = torch.stack([g[:, dist == d].mean(1) for d in range(1, 9)], 1)
    ds = torch.arange(1, 9, dtype=ys.dtype, device=x.device) - 4.5
    cds = -((ys - ys.mean(1, keepdim=True)) @ ds) / (ds @ ds)
    g, vals = gram(), []
    for b in range(len(x)):
        fg = masks[b]
        pos = fg[:, None] & fg[None] & (dist == 1)
        neg = fg[:, None] & ~fg[None] & (dist >= 6)
        pm = (g[b] * pos).sum(1) / pos.sum(1).clamp_min(1)
        nm = (g[b] * neg).sum(1) / neg.sum(1).clamp_min(1)
        ok = fg & (pos.sum(1) > 0) & (neg.sum(1) > 0)
        vals.append((pm - nm)[ok].mean())
    u = F.normalize(x.float(), dim=-1, eps=1e-8)
    rmsc = (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()
    return {"lds": lds, "cds": cds, "srss": torch.stack(vals), "rmsc": rmsc}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


def worker(method: str, n: int, batch: int, device: str) -> dict:
    """Run ``method`` over n images in batches; time the metric calls only."""
    fn = (lambda x, m: spatial_metrics(x, masks=m)) if method == "ours" else naive
    elapsed, means, batch = 0.0, {}, min(batch, n)
    x_all = torch.empty(batch, T, D, device=device)
    m_all = torch.zeros(batch, T, dtype=torch.bool, device=device)
    make_batch(x_all, m_all, seed=0)   # touch the input's pages before the baseline
    base = torch.cuda.memory_allocated() if device == "cuda" else _rss_mib()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x, m = x_all[:b], m_all[:b]
        make_batch(x, m, seed=start)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(x, m)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        for k, v in out.items():
            means[k] = means.get(k, 0.0) + float(v.double().nansum())
        del out
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"method": method, "n": n, "seconds": elapsed, "peak_mib": peak,
            "means": {k: v / n for k, v in means.items()}}


def _run(method: str, n: int, batch: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--batch", str(batch), "--device", device,
           "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="images for ours (default 10000)")
    p.add_argument("--naive-n", type=int, default=500, help="images for the naive baseline, one batch (default 500)")
    p.add_argument("--batch", type=int, default=500, help="images per input batch (default 500)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        with torch.no_grad():
            print(json.dumps(worker(a.worker, a.n, a.batch if a.worker == "ours" else a.n, a.device)))
        return
    sub = _run("ours", a.naive_n, a.batch, a.device, a.threads)     # same images as the baseline: values agree?
    base = _run("naive", a.naive_n, a.naive_n, a.device, a.threads)
    full = _run("ours", a.n, a.batch, a.device, a.threads)
    diff = max(abs(sub["means"][k] - base["means"][k]) for k in sub["means"])
    naive_full = base["seconds"] * a.n / a.naive_n
    est_gib = 4 * a.n * T * T * 3 / 2 ** 30  # the Gram plus two (B, #pairs) index copies, each ~(B, T, T)
    print(f"device {a.device}, {a.threads} threads, tokens ({a.n}, {T}, {D}) in batches of {a.batch}")
    print(f"ours   N={a.n}: {full['seconds']:.1f} s ({1e3 * full['seconds'] / a.n:.2f} ms/image), "
          f"peak extra memory {full['peak_mib']:.0f} MiB")
    print(f"ours   N={a.naive_n}: {sub['seconds']:.2f} s, peak extra {sub['peak_mib']:.0f} MiB")
    print(f"naive  N={a.naive_n}: {base['seconds']:.2f} s, peak extra {base['peak_mib']:.0f} MiB -> N={a.n}: "
          f"~{naive_full:.0f} s (extrapolated), ~{est_gib:.1f} GiB as one batch (estimated)")
    print(f"speed-up {base['seconds'] / sub['seconds']:.1f}x (same {a.naive_n} images); dataset means "
          + ", ".join(f"{k} {v:.6f}" for k, v in sub["means"].items()) + f"; max |ours - naive| {diff:.1e}")


if __name__ == "__main__":
    main()
