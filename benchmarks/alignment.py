"""Benchmark CKNNA: repa_probe.analysis.metrics.cknna (chunked top-k + O(N·k) sparse HSIC) against dense N×N baselines.

Features: a: (N, 1152) (DINOv2-g width) and b = a W + noise: (N, 768) (SiT-B width), float32, row
L2-normalised (PRH convention), topk = 10, unbiased. Every (method, N) runs in a fresh subprocess so its
peak memory can be read cleanly:
  CPU: peak RSS (``ru_maxrss``) during the first call minus the RSS just before it (includes allocator slack);
  GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
Time: the first call, then the best of ``--repeats`` further calls (same process).

Baselines, written here from the formula (no chunking, everything N×N, in the input dtype):
  dense     the formula as written: Σ(K̃L̃) by an N×N matmul (O(N³)), as platonic-rep evaluates it;
  dense-n2  the same but Σ(K̃L̃) = colsum(K̃)·rowsum(L̃) (O(N²)), a stronger dense baseline.
A dense run is skipped when its estimated memory (``DENSE_BUFFERS`` N×N buffers) exceeds ``--dense-limit-gib``;
the estimate is printed instead.

  python benchmarks/alignment.py                 # N = 1000, 10000
  python benchmarks/alignment.py --big           # also N = 50000 (fast path only)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from repa_probe.analysis.metrics import cknna

D_A, D_B, TOPK = 1152, 768, 10
DENSE_BUFFERS = 10   # N×N buffers alive at the dense peak: K, L, 3 masks, 2 masked kernels, products


def make_features(n: int, device: str, seed: int = 0):
    """a: (n, 1152), b: (n, 768) float32 on ``device``, correlated, row L2-normalised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, D_A, generator=g)
    w = torch.randn(D_A, D_B, generator=g) / D_A ** 0.5
    b = a @ w + torch.randn(n, D_B, generator=g)
    return F.normalize(a, dim=1).to(device), F.normalize(b, dim=1).to(device)


def _dense_hsic_u(x: torch.Tensor, y: torch.Tensor, fast_sum: bool) -> torch.Tensor:
    """Unbiased HSIC of (N, N) x, y (float64 result); in place on x and y (they are temporaries)."""
    n = x.shape[0]
    x.fill_diagonal_(0), y.fill_diagonal_(0)
    trace_term = (x * y.T).sum(dtype=torch.float64)
    k_l = (x.sum(0, dtype=torch.float64) * y.sum(1, dtype=torch.float64)).sum() if fast_sum \
        else (x @ y).sum(dtype=torch.float64)
    sx, sy = x.sum(dtype=torch.float64), y.sum(dtype=torch.float64)
    return (trace_term + sx * sy / ((n - 1) * (n - 2)) - 2 * k_l / (n - 2)) / (n * (n - 3))


def dense_cknna(a: torch.Tensor, b: torch.Tensor, topk: int, fast_sum: bool = False) -> float:
    """Plain N×N CKNNA (unbiased, self excluded): masks from full-row top-k, HSIC on masked kernels."""
    k, l = a @ a.T, b @ b.T

    def knn_mask(g):
        g_hat = g.clone().fill_diagonal_(float("-inf"))
        idx = torch.topk(g_hat, topk, dim=1).indices
        del g_hat
        return torch.zeros_like(g).scatter_(1, idx, 1.0)

    mk, ml = knn_mask(k), knn_mask(l)
    m = mk * ml
    sim_kl = _dense_hsic_u(m * k, m * l, fast_sum)
    del m
    sim_kk = _dense_hsic_u(mk * k, mk * k, fast_sum)
    sim_ll = _dense_hsic_u(ml * l, ml * l, fast_sum)
    return float(sim_kl) / (float(torch.sqrt(sim_kk * sim_ll)) + 1e-6)


METHODS = {"fast": lambda a, b: cknna(a, b, topk=TOPK),
           "dense": lambda a, b: dense_cknna(a, b, TOPK),
           "dense-n2": lambda a, b: dense_cknna(a, b, TOPK, fast_sum=True)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, n: int, device: str, repeats: int) -> dict:
    a, b = make_features(n, device)
    fn = METHODS[method]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        sync(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    value = fn(a, b)
    sync()
    first = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [first]
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return {"method": method, "n": n, "value": value, "first_s": first, "best_s": min(times), "peak_bytes": peak}


def run_one(method: str, n: int, device: str, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(n), "--device", device,
           "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", action="store_true", help="also N = 50000 (dense skipped when over the limit)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dense-limit-gib", type=float, default=24.0)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after the first call "
                   "(default 3 for N <= 2000, else 0)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        method, n = args.worker
        print(json.dumps(worker(method, int(n), args.device, args.repeats or 0)))
        return

    sizes = args.sizes + ([50000] if args.big and 50000 not in args.sizes else [])
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"D={D_A} vs {D_B} topk={TOPK} float32 L2-normalised")
    print(f"{'N':>7} {'method':>9} {'first s':>9} {'best s':>9} {'peak MiB':>10} {'cknna':>12} {'speed-up':>9}")
    gib = 1024 ** 3
    for n in sizes:
        repeats = args.repeats if args.repeats is not None else (3 if n <= 2000 else 0)
        fast = run_one("fast", n, args.device, repeats)
        print(f"{n:>7} {'fast':>9} {fast['first_s']:>9.3f} {fast['best_s']:>9.3f} "
              f"{fast['peak_bytes'] / 2 ** 20:>10.1f} {fast['value']:>12.8f}", flush=True)
        for method in ("dense", "dense-n2"):
            need = DENSE_BUFFERS * n * n * 4
            if need > args.dense_limit_gib * gib:
                print(f"{n:>7} {method:>9} skipped: would need ~{need / gib:.0f} GiB "
                      f"({DENSE_BUFFERS} N×N float32 buffers) > {args.dense_limit_gib:g} GiB", flush=True)
                continue
            r = run_one(method, n, args.device, repeats)
            print(f"{n:>7} {method:>9} {r['first_s']:>9.3f} {r['best_s']:>9.3f} {r['peak_bytes'] / 2 ** 20:>10.1f} "
                  f"{r['value']:>12.8f} {r['best_s'] / fast['best_s']:>8.1f}x  "
                  f"(|Δ| = {abs(r['value'] - fast['value']):.1e}, "
                  f"memory {r['peak_bytes'] / max(fast['peak_bytes'], 1):.0f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
