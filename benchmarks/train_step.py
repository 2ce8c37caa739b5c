"""Full training-step throughput: data → VAE posterior sample → encoder → model + REPA → AdamW → EMA.

Our step is the trainer's own: ``TrainState.build`` (``load_config`` overrides; data, encoder, model, EMA,
fused AdamW as the trainer configures them), ``accel.prepare_step_modules`` (torch.compile per
``train.compile``, as ``python -m train`` does) and ``train_step(state)`` (grad clip 1.0, foreach EMA).
Data: a small dataset in REPA's preprocessed layout written to a temp dir (256-px PNGs + random posterior moments (8, 32, 32)), so the model sees 32×32×4
latents (256 tokens at patch 2) and the encoder sees the 256-px images resized to 224 px (16×16 tokens).
The VAE is never run (moments come from the dataset, as in REPA's training).

Variants, timed interleaved in ONE process (rounds A B C, C B A, ... after warm-up, same threads); the
table gives median / min / max s/step, and ratios are medians of per-round ratios (robust to a shared,
loaded machine):
  ours       our SiT + REPA step, eager (train.compile=false; DINOv2-B/14 target, random weights: same compute);
  compiled   with ``--compile``: our step with ``train.compile=true`` (torch.compile of the model and of the
             frozen encoder; same fp32 arithmetic, fused elementwise kernels);
  vanilla    our step with ``repa.proj_coeff=0`` (no encoder, no projector) → REPA overhead;
  official   with ``--reference-repo /tmp/REPA`` (a checkout of sihyun-yu/REPA): their ``models/sit.py``
             SiT and ``loss.py`` SILoss, their data class ``dataset.CustomDataset``, and their train.py
             step rewritten here without accelerate (fp32 on CPU, as ``mixed_precision=no``):
             sample_posterior, preprocess_raw_image (bicubic to 224), encoder under no_grad,
             ``loss.mean() + proj_coeff * proj_loss.mean()``, backward, clip_grad_norm_ 1.0, default AdamW,
             their per-parameter EMA update. Their encoder (``torch.hub`` DINOv2, needs network) is replaced
             by the very same timm DINOv2 module our side uses (identical encoder compute).

FLOPs are analytic (2 per multiply-add): 3× the model's forward (``benchmarks/model_step.forward_flops``)
plus the encoder's forward (no backward). MFU = achieved / ``--peak-tflops``.

    python benchmarks/train_step.py                                    # ours vs vanilla, SiT-B/2, batch 8, CPU
    python benchmarks/train_step.py --reference-repo /tmp/REPA         # + the official step, side by side
    python benchmarks/train_step.py --device cuda --model SiT-XL/2 --batch 256 --bf16 --encoder-depth 8
    python benchmarks/train_step.py --device cuda --model SiT-B/2 --batch 256 --bf16 --compile   # + train.compile
    python benchmarks/train_step.py --model SiT-S/2 --batch 2 --encoder tiny_vit --rounds 1   # smoke test
    python benchmarks/train_step.py --ema --model SiT-XL/2            # EMA update only: foreach vs per-tensor loop
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import _sync, forward_flops  # noqa: E402  (benchmarks/model_step.py)
from reference_step import BenchmarkError, TheirStep, check_reference  # noqa: E402  (benchmarks/reference_step.py)

from repa_probe.training.config import load_config  # noqa: E402
from repa_probe.training.distributed import DistInfo  # noqa: E402
from repa_probe.models import create_model  # noqa: E402
from repa_probe.training.accel import prepare_step_modules  # noqa: E402
from repa_probe.training.trainer import TrainState, train_step, update_ema  # noqa: E402

LATENT_CHANNELS = 4  # SD-VAE


# ----------------------------------------------------------------------------------------------- data
def write_repa_dataset(root: Path, num: int, resolution: int, num_classes: int = 1000, seed: int = 0) -> Path:
    """Write ``num`` samples in REPA's preprocessed layout under ``root`` and return ``root``.

    ``images/00000/img{i:08d}.png``: random uint8 RGB (resolution²); ``vae-sd/00000/img-mean-std-{i:08d}.npy``:
    float32 (2·4, resolution/8, resolution/8) = posterior mean ‖ std (std > 0); both ``dataset.json`` files.
    """
    rng = np.random.default_rng(seed)
    side = resolution // 8
    img_labels, feat_labels = [], []
    for sub in ("images/00000", "vae-sd/00000"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(num):
        label = int(rng.integers(num_classes))
        img = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"images/00000/img{i:08d}.png", compress_level=1)
        mean = rng.standard_normal((LATENT_CHANNELS, side, side), dtype=np.float32) * 5
        std = rng.uniform(0.01, 0.2, (LATENT_CHANNELS, side, side)).astype(np.float32)
        np.save(root / f"vae-sd/00000/img-mean-std-{i:08d}.npy", np.concatenate([mean, std]))
        img_labels.append([f"00000/img{i:08d}.png", label])
        feat_labels.append([f"00000/img-mean-std-{i:08d}.npy", label])
    (root / "images/dataset.json").write_text(json.dumps({"labels": img_labels}))
    (root / "vae-sd/dataset.json").write_text(json.dumps({"labels": feat_labels}))
    return root


# ----------------------------------------------------------------------------------------------- ours
def our_config(a: argparse.Namespace, data_root: Path, proj_coeff: float, compile_: bool = False):
    """The library config for this benchmark (what ``python -m train`` would resolve)."""
    overrides = [
        f"model.name={a.model}", "model.depth=null", "model.hidden_size=null", "model.num_heads=null",
        f"repa.proj_coeff={proj_coeff}", f"repa.encoder_depth={a.encoder_depth}",
        f"repa.projector_dim={a.projector_dim}", f"encoder.name={a.encoder}", "encoder.pretrained=false",
        "vae.name=random:tiny", "data.name=repa", f"data.root={data_root}", f"data.resolution={a.resolution}",
        "data.num_samples=null", "data.num_classes=1000", f"data.num_workers={a.num_workers}",
        f"train.batch_size={a.batch}", f"train.device={a.device}", f"train.precision={'bf16' if a.bf16 else 'fp32'}",
        "optim.lr=1e-4", "optim.grad_clip=1.0", f"train.compile={'true' if compile_ else 'false'}",
    ]
    return load_config(None, overrides)


class OurStep:
    """One training step of ``repa_probe.training.trainer``: its own ``TrainState`` and ``train_step``."""

    def __init__(self, cfg, device: torch.device):
        self.state = TrainState.build(cfg, DistInfo(), device)
        self.model, self.enc = self.state.model, self.state.enc
        prepare_step_modules(self.state)  # as trainer.train does (compiles here when train.compile=true)

    def __call__(self) -> float:
        loss = train_step(self.state)["total"].item()  # the trainer reads it every log_every steps only
        if not math.isfinite(loss):
            raise BenchmarkError(f"our step produced a non-finite loss ({loss})")
        return loss


# ----------------------------------------------------------------------------------------------- flops, timing
def encoder_forward_flops(enc) -> float:
    """Analytic forward FLOPs per image of a timm ViT target encoder (2 FLOPs per multiply-add)."""
    bb = enc.backbone
    d, depth = enc.embed_dim, len(bb.blocks)
    t = enc.num_tokens + bb.num_prefix_tokens
    mlp = bb.blocks[0].mlp.fc1.out_features
    macs = enc.num_tokens * 3 * enc.patch_size ** 2 * d  # patch embedding
    macs += depth * (t * (4 * d * d + 2 * d * mlp) + 2 * t * t * d)
    return 2.0 * macs


def step_flops(model, enc, batch: int) -> float:
    """Training-step FLOPs: forward + backward (3× forward) of the model, forward of the encoder."""
    return batch * (3 * forward_flops(model) + (encoder_forward_flops(enc) if enc is not None else 0.0))


def interleaved_times(steps: dict, warmup: int, rounds: int, device: torch.device) -> dict:
    """Seconds per step for each named step: ``warmup`` untimed rounds, then ``rounds`` timed ones.

    Round r runs every step once, in the given order for even r and reversed for odd r (A B C, C B A, ...),
    so a load that drifts during a round does not favour one step. Returns ``{name: [s, ...]}``.
    """
    times: dict = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if r < warmup:
            print(f"  warm-up round {r + 1}/{warmup} done", flush=True)
        else:
            print(f"  round {r - warmup + 1}/{rounds}: " + "  ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()),
                  flush=True)
    return times


def paired_ratio(slow: list, fast: list) -> float:
    """Median over rounds of slow_i / fast_i (each pair ran in the same round, under the same load)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


# ----------------------------------------------------------------------------------------------- EMA only
@torch.no_grad()
def ema_per_tensor(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The official update: a Python loop of ``mul_`` + ``add_`` per parameter (2 kernels per tensor)."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(m.detach(), alpha=1 - decay)


def time_ema(a: argparse.Namespace, device: torch.device) -> dict:
    """Median ms of one EMA update of ``a.model`` (+ projector): the trainer's ``update_ema`` (one
    ``_foreach_lerp_`` over the parameter lists) vs :func:`ema_per_tensor`, interleaved; checks they agree."""
    kw = dict(z_dims=(768,), encoder_depth=a.encoder_depth, projector_dim=a.projector_dim)
    model, ema = (create_model(a.model, **kw).to(device) for _ in range(2))
    ema.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    fns = {"foreach (trainer)": update_ema, "per-tensor loop": ema_per_tensor}
    times: dict = {name: [] for name in fns}
    for r in range(3 + 10 * a.rounds):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):
            _sync(device)
            start = time.perf_counter()
            fn(ema, model, 0.9999)
            _sync(device)
            if r >= 3:
                times[name].append(1e3 * (time.perf_counter() - start))
    a_ema, b_ema = create_model(a.model, **kw).to(device), create_model(a.model, **kw).to(device)
    b_ema.load_state_dict(a_ema.state_dict())
    update_ema(a_ema, model, 0.9999)
    ema_per_tensor(b_ema, model, 0.9999)
    diff = max((x - y).abs().max().item() for x, y in zip(a_ema.parameters(), b_ema.parameters()))
    print(f"EMA update of {a.model} + projector ({n / 1e6:.1f}M parameters, {len(list(model.parameters()))} "
          f"tensors, fp32, {device}; max |difference| {diff:.1e}):")
    for name, ms in times.items():
        print(f"  {name:<18} median {statistics.median(ms):8.2f} ms  (min {min(ms):.2f}, max {max(ms):.2f})")
    return {name: statistics.median(ms) for name, ms in times.items()}


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SiT-B/2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only; the CPU runs fp32)")
    ap.add_argument("--encoder", default="dinov2_vitb14", help="target encoder (random weights)")
    ap.add_argument("--encoder-depth", type=int, default=4, help="REPA block (4 for B/2, 8 for L and XL)")
    ap.add_argument("--projector-dim", type=int, default=2048)
    ap.add_argument("--resolution", type=int, default=256, help="image side; latents are resolution/8")
    ap.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step (the allocator settles)")
    ap.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 0 CPU, 8 GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-vanilla", action="store_true", help="skip the vanilla (proj_coeff=0) step")
    ap.add_argument("--compile", action="store_true",
                    help="also time our step with train.compile=true (torch.compile of the model and the encoder)")
    ap.add_argument("--reference-repo", type=Path, default=None,
                    help="checkout of sihyun-yu/REPA: also time the official step side by side")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default: 989 on GPU = H100 dense bf16; none on CPU)")
    ap.add_argument("--data-dir", type=Path, default=None, help="keep the synthetic dataset here (default: temp)")
    ap.add_argument("--ema", action="store_true", help="time only the EMA update (foreach vs a per-tensor loop)")
    a = ap.parse_args(argv)
    if a.num_workers is None:
        a.num_workers = 8 if a.device == "cuda" else 0
    if a.device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda but no CUDA device is available")
    if a.reference_repo is not None:
        check_reference(a.reference_repo)
        if a.resolution % 256:
            raise BenchmarkError("the official preprocessing needs --resolution 256 or 512")
    if a.peak_tflops is None and a.device == "cuda":
        a.peak_tflops = 989.0
    return a


def _row(name: str, secs: list, batch: int, flops: float, peak, ratio) -> str:
    med = statistics.median(secs)
    tflops = flops / med / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
    return (f"{name:<10}{med:>9.3f}{min(secs):>9.3f}{max(secs):>9.3f}{batch / med:>10.2f}"
            f"{flops / batch / 1e9:>11.1f}{tflops:>9.3f}{mfu:>7}{ratio:>12}")


def build_steps(a: argparse.Namespace, data_root: Path, device: torch.device) -> tuple[dict, dict, str]:
    """The steps to time ({name: callable}), their FLOPs per step, and a FLOP breakdown line."""
    steps, flops = {}, {}
    ours = OurStep(our_config(a, data_root, 0.5), device)
    steps["ours"], flops["ours"] = ours, step_flops(ours.model, ours.enc, a.batch)
    if a.compile:
        comp = OurStep(our_config(a, data_root, 0.5, compile_=True), device)
        steps["compiled"], flops["compiled"] = comp, flops["ours"]
    if not a.no_vanilla:
        van = OurStep(our_config(a, data_root, 0.0), device)
        steps["vanilla"], flops["vanilla"] = van, step_flops(van.model, None, a.batch)
    if a.reference_repo is not None:
        steps["official"], flops["official"] = TheirStep(a.reference_repo, a, data_root, ours.enc.backbone,
                                                         device), flops["ours"]
    c = ours.model.config
    proj = 3 * 2.0 * ours.model.num_tokens * sum(
        c["hidden_size"] * c["projector_dim"] + c["projector_dim"] ** 2 + c["projector_dim"] * z for z in c["z_dims"])
    model = 3 * forward_flops(ours.model)
    enc = encoder_forward_flops(ours.enc)
    note = (f"GFLOP/img: model fwd+bwd {model / 1e9:.1f} (REPA projector {proj / 1e9:.1f} of it), encoder fwd "
            f"{enc / 1e9:.1f}; REPA adds {100 * (proj + enc) / (model - proj):.1f}% FLOPs over vanilla")
    return steps, flops, note


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{step name: median seconds per step}``."""
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's train.tf32 default
        torch.backends.cudnn.allow_tf32 = True
    if a.ema:
        return time_ema(a, device)
    if a.reference_repo is None:
        print("official step skipped: pass --reference-repo /path/to/sihyun-yu/REPA to time it side by side")
    with tempfile.TemporaryDirectory(prefix="repa_train_step_") as tmp:
        # enough samples that no timed step starts a new epoch (a loader's first batch of an epoch waits for its
        # workers; REPA's ImageNet epoch is 5,000 steps, so that wait is not part of a training step)
        num = max(16, a.batch * (a.warmup + a.rounds + 2))
        data_root = write_repa_dataset(a.data_dir or Path(tmp) / "data", num, a.resolution)
        while True:  # on a GPU: batch 256, or the largest power-of-two fraction of it that fits
            try:
                steps, flops, note = build_steps(a, data_root, device)
                first = {name: step() for name, step in steps.items()}  # untimed: allocations, OOM check
                break
            except torch.cuda.OutOfMemoryError:
                if device.type != "cuda" or a.batch == 1:
                    raise
                steps = None
                torch.cuda.empty_cache()
                a.batch //= 2
                print(f"out of GPU memory: retrying with batch {a.batch}", flush=True)
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        prec = "bf16 autocast" if a.bf16 and device.type == "cuda" else "fp32"
        print(f"{a.model} + REPA (block {a.encoder_depth}, projector {a.projector_dim}, {a.encoder} random "
              f"weights), batch {a.batch}, {a.resolution}px images -> {a.resolution // 8}x{a.resolution // 8}x4 "
              f"latents, {prec}; {dev}; torch {torch.__version__}; {a.warmup} warm-up + {a.rounds} timed "
              f"interleaved rounds", flush=True)
        print("first-step loss: " + ", ".join(f"{n} {v:.4f}" for n, v in first.items()), flush=True)
        times = interleaved_times(steps, a.warmup, a.rounds, device)
    print(f"{'step':<10}{'median s':>9}{'min s':>9}{'max s':>9}{'images/s':>10}{'GFLOP/img':>11}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'vs official':>12}")
    for name, secs in times.items():
        ratio = f"{paired_ratio(times['official'], secs):.2f}x" if "official" in times and name != "official" else ""
        print(_row(name, secs, a.batch, flops[name], a.peak_tflops, ratio))
    print(note)
    result = {name: statistics.median(secs) for name, secs in times.items()}
    if "vanilla" in times:
        print(f"REPA overhead over vanilla: {100 * (paired_ratio(times['ours'], times['vanilla']) - 1):.1f}% "
              f"of step time (median of per-round ratios)")
    if "official" in times:
        ratio = paired_ratio(times["official"], times["ours"])
        medians = result["official"] / result["ours"]
        print(f"ours vs official throughput: {ratio:.2f}x (median of per-round ratios; ratio of medians "
              f"{medians:.2f}x); target >= 1.2x: {'met' if ratio >= 1.2 else 'NOT met'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as exc:
        sys.exit(f"error: {exc}")
