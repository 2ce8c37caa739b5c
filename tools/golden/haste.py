"""Golden part "haste": a small random HASTE model (NUS-HPC-AI-Lab/HASTE ``models/sit.py``) and its loss.

HASTE's loss hard-codes what it aligns: the attention logits of model blocks 5-8 (0-based 4-7, the first 12 heads)
against encoder layers 9-12 (0-based 8-11), on 256 tokens. The golden model therefore has 12 heads, a 16 x 16 token
grid (32 px, patch 2) and ``encoder_depth`` 8 (their ``return_act`` path records blocks 1..encoder_depth).
Its sampler (``samplers.py``) is REPA's, byte for byte: the "sampling" part covers it. Files:

* ``haste_checkpoint.pt``: REPA's training layout, which their ``train.py`` keeps: ``{model, ema, opt, args, steps}``
  (``args`` from their ``parse_args``, with ``attn_coeff`` and ``early_stop_point``).
* ``haste_io.pt``: the EMA model's ``forward(x, t, y, return_act=True)``: ``x, t, y``, ``out``, ``zs`` (projected
  tokens at block 8) and ``attn_rows``: query rows 0 and 128 of every recorded block's logits
  ``(encoder_depth, B, heads, 2, 256)`` (the full maps are large; the loss below uses them all).
* ``haste_loss.pt``: their ``SILoss`` with the teacher's attention logits for layers 9-12 given as low-rank
  products ``teacher_q @ teacher_k^T`` (``(4, B, 12, 256, r)`` each, so the file stays small) and REPA targets
  ``proj_s``; the ``t`` and ``noise`` it drew (replayed from the global RNG and checked), ``x_t``,
  ``denoising_loss``, ``attn_loss``, ``proj_loss``; and ``denoise_only_loss`` (after the switch-off step).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tools.golden.common import GoldenError, import_file, need, random_model, save_pt, seed_all, training_checkpoint

B, TOKENS, RANK = 2, 256, 2
CONFIG = dict(path_type="linear", input_size=32, patch_size=2, in_channels=4, hidden_size=24, decoder_hidden_size=24,
              encoder_depth=8, depth=9, num_heads=12, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10,
              use_cfg=True, z_dims=[16], projector_dim=16, qk_norm=False, fused_attn=True)
TEACHER_LAYERS = (8, 9, 10, 11)  # 0-based encoder layers their loss reads (zs[i + 4], i = 4..7)
TRAIN_ARGV = ["--exp-name", "golden", "--model", "SiT-B/2", "--encoder-depth", "8", "--attn-coeff", "0.5",
              "--early-stop-point", "250000"]


def checkpoint(repo: Path) -> tuple[dict, torch.nn.Module]:
    """REPA's training checkpoint layout (which their train.py keeps) and the EMA model."""
    cls = import_file("golden_haste_models_sit", repo / "models" / "sit.py").SiT
    model, ema = random_model(cls, CONFIG, 30), random_model(cls, CONFIG, 31)
    return training_checkpoint(model, ema, repo / "train.py", TRAIN_ARGV, 250000), ema


@torch.no_grad()
def forward_record(ema: torch.nn.Module) -> dict:
    gen = torch.Generator().manual_seed(32)
    s = CONFIG["input_size"]
    x = torch.randn(B, CONFIG["in_channels"], s, s, generator=gen)
    t = torch.tensor([0.0, 0.7])
    y = torch.tensor([3, CONFIG["num_classes"]], dtype=torch.int64)
    out, attn, zs = ema(x, t, y, return_act=True)
    rows = torch.stack([a[:, :, [0, TOKENS // 2]] for a in attn])
    return dict(config=dict(CONFIG), x=x, t=t, y=y, out=out, zs=list(zs), attn_rows=rows)


@torch.no_grad()
def loss_record(repo: Path, ema: torch.nn.Module) -> dict:
    loss_mod = import_file("golden_haste_loss", repo / "loss.py")
    gen = torch.Generator().manual_seed(33)
    s = CONFIG["input_size"]
    x0 = torch.randn(B, CONFIG["in_channels"], s, s, generator=gen)
    y = torch.tensor([CONFIG["num_classes"], 7], dtype=torch.int64)
    teacher_q = torch.randn(len(TEACHER_LAYERS), B, 12, TOKENS, RANK, generator=gen)
    teacher_k = torch.randn(len(TEACHER_LAYERS), B, 12, TOKENS, RANK, generator=gen)
    teacher = [None] * TEACHER_LAYERS[0] + [q @ k.transpose(-2, -1) for q, k in zip(teacher_q, teacher_k)]
    proj_s = [torch.randn(B, TOKENS, CONFIG["z_dims"][0], generator=gen)]
    calls = []

    def recorder(x, t, **kwargs):
        calls.append((x.clone(), t.clone()))
        return ema(x, t, **kwargs)

    loss = loss_mod.SILoss(prediction="v", path_type="linear", weighting="uniform")
    seed_all(34)
    denoise, attn_loss, proj_loss = loss(recorder, x0, dict(y=y), zs=[teacher], proj_s=proj_s)
    seed_all(34)  # replay: t = rand((B, 1, 1, 1)), then noise = randn_like(x0)
    t = torch.rand((B, 1, 1, 1))
    noise = torch.randn_like(x0)
    if not torch.equal(calls[0][0], (1 - t) * x0 + t * noise):
        raise GoldenError("HASTE SILoss: replaying the RNG does not reproduce the model input it built")
    seed_all(34)
    denoise_only = loss(recorder, x0, dict(y=y), zs=[teacher], proj_s=proj_s, denoise_only=True)[0]
    return dict(x0=x0, y=y, teacher_q=teacher_q, teacher_k=teacher_k, proj_s=proj_s, t=t.flatten(), noise=noise,
                x_t=calls[0][0], denoising_loss=denoise, attn_loss=torch.as_tensor(attn_loss),
                proj_loss=torch.as_tensor(proj_loss), denoise_only_loss=denoise_only)


def write(out_dir: Path, repos: dict, commits: dict | None = None) -> list[Path]:
    if not need(repos, "haste", part="haste"):
        return []
    repo, out_dir = Path(repos["haste"]), Path(out_dir)
    ckpt, ema = checkpoint(repo)
    return [save_pt(ckpt, out_dir / "haste_checkpoint.pt"), save_pt(forward_record(ema), out_dir / "haste_io.pt"),
            save_pt(loss_record(repo, ema), out_dir / "haste_loss.pt")]
