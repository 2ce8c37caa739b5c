"""Forward+backward time per image of the diffusion transformers, fused SDPA vs naive attention.

Default (quick, CPU): SiT-B/2 with a REPA projector (768-d target, encoder_depth 4) and DiT-B/2 on
32x32x4 latents, batch 2, 2 timed iterations. Each model is timed twice in the same run: with the
model's ``F.scaled_dot_product_attention`` and with a naive softmax(QK^T)V baseline; the ratio is
printed. FLOPs are counted analytically (2 per multiply-add; a training step = 3x the forward
pass); MFU = achieved / ``--peak-tflops`` (default 989: H100 SXM dense bf16).

    python benchmarks/model_step.py                                   # quick CPU run
    python benchmarks/model_step.py --model SiT-XL/2 --device cuda --bf16 --batch 32 --iters 10
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import types

import torch
import torch.nn.functional as F

from repa_probe.models import DiffusionTransformer, create_model


def forward_flops(model: DiffusionTransformer) -> float:
    """Analytic forward FLOPs per image (matmuls and attention; 2 FLOPs per multiply-add)."""
    c = model.config
    d, t, p, depth = c["hidden_size"], model.num_tokens, c["patch_size"], c["depth"]
    mlp = int(d * c["mlp_ratio"])
    macs = t * c["in_channels"] * p * p * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP
    per_block = d * 6 * d + t * (3 * d * d + d * d + 2 * d * mlp) + 2 * t * t * d  # adaLN, linears, QK^T and AV
    macs += depth * per_block
    macs += d * 2 * d + t * d * p * p * model.out_channels  # final layer
    for z in c["z_dims"]:
        pd = c["projector_dim"]
        macs += t * (d * pd + pd * pd + pd * z)
    return 2.0 * macs


def _naive_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Baseline attention: explicit (B, heads, T, T) score matrix, softmax, then AV."""
    b, t, d = x.shape
    q, k, v = self.qkv_heads(x)
    scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
    out = scores.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, t, d))


@contextlib.contextmanager
def naive_attention(model: DiffusionTransformer):
    """Temporarily replace every block's attention with the naive implementation."""
    for blk in model.blocks:
        blk.attn.forward = types.MethodType(_naive_attention_forward, blk.attn)
    try:
        yield
    finally:
        for blk in model.blocks:
            del blk.attn.forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, batch: int, device: torch.device, bf16: bool):
    """A closure running one training step (forward + backward of a v-MSE + cosine surrogate loss)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    s, ch = model.input_size, model.in_channels
    x = torch.randn(batch, ch, s, s, generator=g).to(device)
    t = (torch.randint(0, 1000, (batch,), generator=g) if model.family == "DiT" else torch.rand(batch, generator=g)).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    target = torch.randn(batch, model.returned_channels, s, s, generator=g).to(device)
    feats = [torch.randn(batch, model.num_tokens, z, generator=g).to(device) for z in model.z_dims]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out, zs = model(x, t, y)
        loss = (out.float() - target).square().mean()
        for z, f in zip(zs, feats):
            loss = loss - F.cosine_similarity(z.float(), f, dim=-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def time_fused_and_naive(model, batch, iters, warmup, device, bf16, naive: bool) -> tuple[float, float]:
    """Best-of-``iters`` seconds per step for SDPA and (interleaved, same run) the naive baseline.

    Interleaving the two variants and taking the minimum keeps the ratio fair on a shared machine.
    """
    step = make_step(model, batch, device, bf16)
    fused_times, naive_times = [], []
    for i in range(warmup + iters):
        f = timed(step, device)
        n = math.nan
        if naive:
            with naive_attention(model):
                n = timed(step, device)
        if i >= warmup:
            fused_times.append(f)
            naive_times.append(n)
    return min(fused_times), (min(naive_times) if naive else math.nan)


def build(name: str, device: torch.device, with_projector: bool) -> DiffusionTransformer:
    kw = dict(z_dims=(768,), encoder_depth=4) if with_projector else {}
    model = create_model(name, **kw).to(device)
    with torch.no_grad():  # adaLN-Zero init makes blocks no-ops; give them realistic weights
        for blk in model.blocks:
            blk.adaLN_modulation[1].weight.normal_(0, 0.02)
        model.final_layer.linear.weight.normal_(0, 0.02)
    return model.train()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model name (repeatable); default SiT-B/2 (+REPA) and DiT-B/2")
    ap.add_argument("--no-projector", action="store_true", help="SiT models without the REPA projector")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations (best of)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak for MFU (H100 dense bf16: 989)")
    ap.add_argument("--skip-naive", action="store_true", help="do not time the naive-attention baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = a.model or ["SiT-B/2", "DiT-B/2"]
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f" torch={torch.__version__} batch={a.batch} iters={a.iters} bf16={a.bf16}")
    header = f"{'model':<16}{'params':>9}{'GFLOP/img':>11}{'ms/img':>10}{'naive ms/img':>14}{'naive/fused':>13}{'TFLOP/s':>9}{'MFU':>8}"
    print(header)
    for name in names:
        proj = name.startswith("SiT") and not a.no_projector
        model = build(name, device, proj)
        label = name + (" +REPA" if proj else "")
        n_params = sum(p.numel() for p in model.parameters())
        step_flops = 3 * forward_flops(model) * a.batch
        fused, naive = time_fused_and_naive(model, a.batch, a.iters, a.warmup, device, a.bf16, not a.skip_naive)
        tflops = step_flops / fused / 1e12
        print(f"{label:<16}{n_params / 1e6:>8.1f}M{step_flops / a.batch / 1e9:>11.1f}{1e3 * fused / a.batch:>10.1f}"
              f"{1e3 * naive / a.batch:>14.1f}{naive / fused:>13.2f}{tflops:>9.3f}{100 * tflops / a.peak_tflops:>7.2f}%")
        del model
    print("GFLOP/img is one training step (3x forward, 2 FLOPs per multiply-add); MFU is relative to "
          f"--peak-tflops={a.peak_tflops:g}.")


if __name__ == "__main__":
    main()
