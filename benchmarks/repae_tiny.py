"""REPA-E's tiny run on the CPU: wall time against the plain tiny REPA run, and the VAE's REPA loss with and
without the REPA term back-propagated into the VAE (``repa.vae_coeff`` 1.5 vs 0).

Three runs in one process, same machine, interleaved order: ``configs/tiny.yaml`` (baseline: REPA in pixel
space, no VAE), ``configs/repae_tiny.yaml`` and the same with ``repa.vae_coeff=0``. Prints each run's wall time,
the REPA-E / baseline ratio, and the logged ``vae_repa`` (the VAE update's REPA loss, mean over each
``train.log_every`` window) and reconstruction L1 of the two REPA-E runs.

    python benchmarks/repae_tiny.py                     # the shipped configs (200 steps each)
    python benchmarks/repae_tiny.py --steps 50          # quicker
"""
from __future__ import annotations

import argparse
import tempfile
import time

from repa_probe.training import rundir
from repa_probe.training.config import load_config
from repa_probe.training.trainer import train


def _run(cfg_path: str, out: str, name: str, steps: int | None, *extra: str) -> tuple[float, list]:
    over = [f"run.out_dir={out}", f"run.name={name}", "train.tensorboard=false", *extra]
    if steps is not None:
        over.append(f"train.steps={steps}")
    start = time.perf_counter()
    run = train(load_config(cfg_path, over))
    return time.perf_counter() - start, rundir.read_metrics(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps of every run (default: the configs')")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        base_s, _ = _run("configs/tiny.yaml", out, "tiny", args.steps)
        e2e_s, e2e = _run("configs/repae_tiny.yaml", out, "repae", args.steps)
        off_s, off = _run("configs/repae_tiny.yaml", out, "repae_vae0", args.steps, "repa.vae_coeff=0")
    print(f"tiny (REPA, pixels): {base_s:.1f} s;  repae_tiny: {e2e_s:.1f} s ({e2e_s / base_s:.2f}x);  "
          f"repae_tiny vae_coeff=0: {off_s:.1f} s")
    print("step   vae_repa(1.5)  vae_repa(0)   recon(1.5)  recon(0)")
    for a, b in zip(e2e, off):
        print(f"{a['step']:5d}  {a['vae_repa']:12.4f}  {b['vae_repa']:11.4f}  {a['recon']:10.4f}  {b['recon']:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
