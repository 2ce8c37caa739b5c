"""The GPU day in one script (run by ``benchmarks/gpu.sh``): four measurements, written as a dated section of
``docs/benchmarks.md``. Random-initialised weights throughout (the compute of the real ones; no download).

1. **Train step**, SiT-XL/2 + REPA (DINOv2-B/14 target, block 8, bf16): ``benchmarks/train_step.py`` eager vs
   compiled (``train.compile=true``), images/s and MFU at the largest micro-batch that fits (256, halved on
   out-of-memory). Goal: MFU >= 40%.
2. **Sampling**, SiT-XL/2, SDE 250 steps, CFG 1.8 on t <= 0.7, batch 64, same noise and labels: ours
   (``repa_probe.sampling.sample`` under bf16 autocast, fused SDPA attention) against the loop structure of
   REPA's ``generate.py`` written here for timing only (facts in /work/shared/reference: fp32 with TF32,
   ``--fused-attn False`` = naive softmax(QK^T)V attention, float64 state, Euler-Maruyama with the batch
   doubled only inside the guidance interval, mean-only last step 0.04 -> 0). Goal: >= 1.5x.
3. **FID-50K wall time on one GPU**, projected: 50 000 x (our sampling s/image + SD-VAE decode s/image, a
   random-initialised ``AutoencoderKL`` of SD-VAE's shape) + Inception feature extraction is not timed (no
   weights offline; it is a few minutes for 50K images on any GPU and is stated as not included).
4. **Alignment pass** of SiT-XL/2 over 10 000 images x 28 blocks x 11 timesteps: one capture pass
   (:mod:`repa_probe.analysis.core.capture`, mean-pooled, bf16) timed on a subset, projected linearly.

``--dry-run``: the same code on tiny sizes on the CPU (seconds; the test suite runs it; the compiled train step is
left out there, compiling alone takes minutes on a CPU). Nothing here decides
the numbers: each is measured in this run against its baseline measured in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (benchmarks/train_step.py)
from model_step import naive_attention  # noqa: E402

from repa_probe.analysis.core.capture import CaptureSpec, MeanPool, capture  # noqa: E402
from repa_probe.analysis.core.features import ModelInputs  # noqa: E402
from repa_probe.models import create_model  # noqa: E402
from repa_probe.objectives import FlowMatching  # noqa: E402
from repa_probe.sampling import sample  # noqa: E402
from repa_probe.timesteps import parse_times  # noqa: E402

NULL_CLASS = 1000


@dataclasses.dataclass
class Plan:
    """Sizes of one run: the GPU day, or the CPU dry run."""

    model: str
    encoder: str
    encoder_depth: int
    resolution: int
    train_batch: int
    sample_batch: int
    sample_steps: int
    vae: str
    align_images: int
    align_subset: int
    align_timesteps: int
    align_batch: int
    overrides: dict = dataclasses.field(default_factory=dict)


PLANS = {
    "gpu": Plan("SiT-XL/2", "dinov2_vitb14", 8, 256, 256, 64, 250, "sd", 10_000, 1024, 11, 256),
    "dry": Plan("SiT-S/4", "tiny_vit", 1, 32, 2, 2, 3, "tiny", 64, 8, 2, 4,
                overrides=dict(depth=2, hidden_size=64, num_heads=2, input_size=4, encoder_depth=1, z_dims=(192,),
                               projector_dim=64)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best of ``repeats`` wall seconds of ``fn()`` (after one untimed call)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _model(plan: Plan, device: torch.device):
    torch.manual_seed(0)
    kw = dict(plan.overrides)
    kw.pop("encoder_depth", None), kw.pop("z_dims", None), kw.pop("projector_dim", None)
    return create_model(plan.model, **kw).to(device).eval()


# ----------------------------------------------------------------------------------------------- 1. train
def bench_train(plan: Plan, device: torch.device, peak_tflops: float) -> list[str]:
    """``train_step.py`` eager vs compiled; its table verbatim."""
    argv = ["--model", plan.model, "--batch", str(plan.train_batch), "--device", device.type,
            "--encoder", plan.encoder, "--encoder-depth", str(plan.encoder_depth), "--resolution",
            str(plan.resolution), "--rounds", "3" if device.type == "cuda" else "1",
            "--warmup", "1" if device.type == "cuda" else "0",
            "--no-vanilla", "--peak-tflops", str(peak_tflops)]
    if device.type == "cuda":
        argv += ["--bf16", "--compile"]
    else:
        argv += ["--projector-dim", "64", "--num-workers", "0"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_step.main(argv)
    return ["### Train step (`benchmarks/train_step.py " + " ".join(argv) + "`)", "", "```", out.getvalue().strip(),
            "```", ""]


# -------------------------------------------------------------------------------------------- 2. sampling
@torch.no_grad()
def generate_py_loop(model, z: torch.Tensor, y: torch.Tensor, steps: int, cfg: float, high: float) -> torch.Tensor:
    """Timing baseline: the loop structure of REPA's ``generate.py`` + Euler-Maruyama (see the module docstring).
    ``z: (B, C, H, W)`` noise, ``y: (B,)`` labels -> ``(B, C, H, W)`` float64."""
    ts = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = z.to(torch.float64)
    null = torch.full_like(y, NULL_CLASS)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        guided = cfg > 1.0 and t <= high
        xin = torch.cat([x, x]) if guided else x
        yin = torch.cat([y, null]) if guided else y
        tin = t.expand(xin.shape[0]).to(device=z.device, dtype=z.dtype)
        v = model(xin.to(z.dtype), tin, yin)[0].to(torch.float64)
        score = (-(1 - t) * v - xin) / t
        drift = v - 0.5 * (2 * t) * score
        if guided:
            cond, uncond = drift.chunk(2)
            drift = uncond + cfg * (cond - uncond)
        dt = t_next - t
        x = x + drift * dt
        if i < steps - 1:
            x = x + torch.sqrt(2 * t) * torch.sqrt(dt.abs()) * torch.randn_like(x)
    return x


def bench_sampling(plan: Plan, device: torch.device) -> tuple[list[str], float]:
    """Ours vs the generate.py loop on the same batch; returns the lines and our seconds per image."""
    model = _model(plan, device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(plan.sample_batch, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (plan.sample_batch,), generator=g).to(device)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def ours():
        with bf16:
            sample(model, z, y, method="sde", steps=plan.sample_steps, cfg_scale=1.8, guidance_interval=(0.0, 0.7))

    def theirs():
        with naive_attention(model):
            generate_py_loop(model, z, y, plan.sample_steps, 1.8, 0.7)

    t_ours, t_theirs = _timed(ours, device), _timed(theirs, device)
    b = plan.sample_batch
    prec = "bf16 autocast" if device.type == "cuda" else "fp32"
    lines = [f"### Sampling {plan.model}, SDE {plan.sample_steps} steps, CFG 1.8 on t <= 0.7, batch {b}", "",
             "| loop | s / batch | images/s |", "|---|---|---|",
             f"| ours (`sample`, {prec}, SDPA) | {t_ours:.2f} | {b / t_ours:.2f} |",
             f"| REPA `generate.py` loop structure (fp32{'/TF32' if device.type == 'cuda' else ''}, naive attention, "
             f"float64 state) | {t_theirs:.2f} | {b / t_theirs:.2f} |", "",
             f"Speed-up: **{t_theirs / t_ours:.2f}x** (goal >= 1.5x).", ""]
    return lines, t_ours / b


# ------------------------------------------------------------------------------------------------ 3. FID
def _vae(plan: Plan, device: torch.device):
    from diffusers import AutoencoderKL

    from repa_probe.encoders.vae import TINY_VAE_CONFIG, LatentVAE

    torch.manual_seed(0)
    cfg = TINY_VAE_CONFIG if plan.vae == "tiny" else dict(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=256)
    return LatentVAE(AutoencoderKL(**cfg), f"random:{plan.vae}").to(device).eval()


def bench_fid(plan: Plan, device: torch.device, sample_s_per_image: float) -> list[str]:
    """FID-50K wall time: sampling (measured above) + VAE decode (measured here), per image x 50 000."""
    vae = _vae(plan, device)
    c, s = vae.latent_channels, plan.resolution // vae.downsample_factor
    z = torch.randn(plan.sample_batch, c, s, s, device=device)
    with torch.no_grad():
        t_dec = _timed(lambda: vae.decode(z), device) / plan.sample_batch
    total = 50_000 * (sample_s_per_image + t_dec)
    return [f"### FID-50K on one GPU (projected): **{total / 3600:.2f} h** = 50 000 x ({sample_s_per_image:.4f} s "
            f"sampling + {t_dec:.4f} s SD-VAE decode per image); Inception features not included.", ""]


# ------------------------------------------------------------------------------------------ 4. alignment
def bench_alignment(plan: Plan, device: torch.device) -> list[str]:
    """One capture pass over every block and timestep on ``align_subset`` images, projected to ``align_images``."""
    model = _model(plan, device)
    n = plan.align_subset
    data = torch.randn(n, model.in_channels, model.input_size, model.input_size)
    inputs = ModelInputs(data, torch.zeros(n, dtype=torch.int64), torch.arange(n), pixel=False)
    times = parse_times([i / (plan.align_timesteps - 1) for i in range(plan.align_timesteps)])
    layers = list(range(1, model.depth + 1))
    spec = CaptureSpec(layers, times, torch.full((n,), model.num_classes), 0, plan.align_batch, device,
                       progress=False)
    seconds = _timed(lambda: capture(model, FlowMatching(), inputs, spec, [MeanPool()]), device)
    total = seconds * plan.align_images / n
    return [f"### Alignment pass {plan.model}: {plan.align_images} images x {len(layers)} blocks x "
            f"{len(times)} timesteps (one capture pass, mean-pooled): **{total / 60:.1f} min** projected "
            f"({seconds:.1f} s for {n} images, batch {plan.align_batch}).", ""]


# ------------------------------------------------------------------------------------------------- main
def run(plan: Plan, device: torch.device, peak_tflops: float) -> str:
    """Every measurement; the Markdown section."""
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()} (dry run)"
    lines = [f"## GPU day — `benchmarks/gpu.sh` ({datetime.date.today()}, {dev}, torch {torch.__version__})", ""]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    lines += bench_train(plan, device, peak_tflops)
    sampling, per_image = bench_sampling(plan, device)
    lines += sampling
    lines += bench_fid(plan, device, per_image)
    lines += bench_alignment(plan, device)
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds): checks the script")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file (gpu.sh: "
                   "docs/benchmarks.md); default: print only")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: benchmarks/gpu.sh measures a GPU (use --dry-run to check it on the CPU)")
    device = torch.device("cpu" if a.dry_run else "cuda")
    text = run(PLANS["dry" if a.dry_run else "gpu"], device, a.peak_tflops)
    print(text)
    if a.out is not None:
        with open(a.out, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
