"""Golden part "reg": a small random REG model (Martinser/REG ``models/sit.py``), its loss and its sampler.

Files (``tests/data/golden/``):

* ``reg_checkpoint.pt``: their training checkpoint layout ``{model, ema, opt, args, steps}`` (``args``: the
  Namespace their ``train.py`` ``parse_args`` builds; ``ema`` differs from ``model``, so picking the EMA shows).
* ``reg_io.pt``: the EMA model's forward ``model(x, t, y, cls_token=c)`` in eval mode: ``x, t, y, cls_token``,
  ``out``, ``zs`` (the projected tokens, class token first), ``cls_out`` and ``hidden`` (every block's output,
  ``(depth, B, 1 + T, D)``).
* ``reg_loss.pt``: their ``loss.SILoss`` (linear, v, uniform) on the EMA model: the encoder's ``cls_token`` and
  REPA targets ``zs`` (class token first), the ``t``, ``noise`` and ``noise_cls`` it drew (read back by replaying
  the global RNG and checked against the inputs it built), ``x_t``, ``cls_t``, ``denoising_loss``, ``proj_loss``
  and ``denoising_loss_cls``.
* ``reg_sampling.pt``: their ``euler_maruyama_sampler`` (the only sampler ``generate.py`` runs) on the EMA
  model: ``noise``, ``labels``, ``cls_noise`` and per case the settings (``cfg_scale``, ``cls_cfg_scale``,
  guidance interval, steps), the ``seed`` set right before their call and their ``out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tools.golden.common import GoldenError, import_file, need, random_model, save_pt, seed_all, training_checkpoint

B = 4
NUM_CLASSES = 1000  # their sampler hard-codes the null label 1000
CONFIG = dict(path_type="linear", input_size=8, patch_size=2, in_channels=4, hidden_size=32, decoder_hidden_size=32,
              encoder_depth=2, depth=3, num_heads=4, mlp_ratio=4.0, class_dropout_prob=0.1,
              num_classes=NUM_CLASSES, use_cfg=True, z_dims=[24], projector_dim=32, qk_norm=False, fused_attn=False)
CLS_DIM = CONFIG["z_dims"][0]  # their model overrides cls_token_dim with z_dims[0]
TRAIN_ARGV = ["--exp-name", "golden", "--model", "SiT-B/2", "--encoder-depth", str(CONFIG["encoder_depth"]),
              "--proj-coeff", "0.5", "--cls", "0.03"]
SAMPLING = {  # case -> their sampler's settings (cls_cfg_scale <= 0: the class token follows the conditional drift)
    "sde": dict(steps=6, cfg_scale=1.0, cls_cfg_scale=1.0, low=0.0, high=1.0, seed=5),
    "sde_cfg_interval": dict(steps=8, cfg_scale=2.3, cls_cfg_scale=2.3, low=0.0, high=0.85, seed=6),
    "sde_cfg_cls_conditional": dict(steps=5, cfg_scale=1.8, cls_cfg_scale=0.0, low=0.0, high=0.7, seed=7),
    "sde_cfg_cls_scale": dict(steps=7, cfg_scale=2.0, cls_cfg_scale=1.5, low=0.2, high=0.9, seed=8),
}


def _modules(repo: Path):
    sit = import_file("golden_reg_models_sit", repo / "models" / "sit.py")
    loss, samplers = repo / "loss.py", repo / "samplers.py"
    return sit, import_file("golden_reg_loss", loss), import_file("golden_reg_samplers", samplers)


def checkpoint(repo: Path) -> tuple[dict, torch.nn.Module]:
    """``{model, ema, opt, args, steps}`` as their train.py saves it, and the EMA model."""
    cls = _modules(repo)[0].SiT
    model, ema = random_model(cls, CONFIG, 20), random_model(cls, CONFIG, 21)
    return training_checkpoint(model, ema, repo / "train.py", TRAIN_ARGV, 4000), ema


def _latents(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """A generator seeded with ``seed`` and the ``(B, C, H, W)`` latents drawn first from it."""
    gen = torch.Generator().manual_seed(seed)
    s = CONFIG["input_size"]
    return gen, torch.randn(B, CONFIG["in_channels"], s, s, generator=gen)


@torch.no_grad()
def forward_record(ema: torch.nn.Module) -> dict:
    gen, x = _latents(22)
    t = torch.cat([torch.tensor([0.0]), torch.rand(B - 2, generator=gen), torch.tensor([1.0])])
    y = torch.tensor([0, 17, NUM_CLASSES, NUM_CLASSES - 1], dtype=torch.int64)
    cls_token = torch.randn(B, CLS_DIM, generator=gen)
    hidden = []
    hooks = [blk.register_forward_hook(lambda m, i, o: hidden.append(o.detach().clone())) for blk in ema.blocks]
    try:
        out, zs, cls_out = ema(x, t, y, cls_token=cls_token)
    finally:
        for h in hooks:
            h.remove()
    return dict(config=dict(CONFIG), x=x, t=t, y=y, cls_token=cls_token, out=out, zs=list(zs), cls_out=cls_out,
                hidden=torch.stack(hidden))


@torch.no_grad()
def loss_record(repo: Path, ema: torch.nn.Module) -> dict:
    """Their SILoss; its draws (t, noise, class-token noise) are replayed from the global RNG and checked."""
    _, loss_mod, _ = _modules(repo)
    gen, x0 = _latents(23)
    y = torch.tensor([3, NUM_CLASSES, 999, 40], dtype=torch.int64)
    cls_token = torch.randn(B, CLS_DIM, generator=gen)
    _, own, _ = ema(x0, torch.full((B,), 0.5), y, cls_token=cls_token)  # targets that partly agree (cos ~ 0.5)
    zs = [z + z.std() * torch.randn(z.shape, generator=gen) for z in own]
    calls = []

    def recorder(x, t, **kwargs):
        out = ema(x, t, **kwargs)
        calls.append((x.clone(), t.clone(), kwargs["cls_token"].clone()))
        return out

    loss = loss_mod.SILoss(prediction="v", path_type="linear", weighting="uniform")
    seed_all(24)
    denoise, proj, _, _, denoise_cls = loss(recorder, x0, dict(y=y), zs=zs, cls_token=cls_token)
    seed_all(24)  # replay: t = rand((B, 1, 1, 1)), noise = randn_like(x0), noise_cls = randn_like(cls_token)
    t = torch.rand((B, 1, 1, 1))
    noise, noise_cls = torch.randn_like(x0), torch.randn_like(cls_token)
    x_t, t_seen, cls_t = calls[0]
    if not (torch.equal(x_t, (1 - t) * x0 + t * noise) and torch.equal(t_seen, t.flatten())
            and torch.equal(cls_t, (1 - t.flatten()[:, None]) * cls_token + t.flatten()[:, None] * noise_cls)):
        raise GoldenError("REG SILoss: replaying the RNG does not reproduce the inputs it built (draw order changed?)")
    return dict(x0=x0, y=y, cls_token=cls_token, zs=zs, t=t.flatten(), noise=noise, noise_cls=noise_cls, x_t=x_t,
                cls_t=cls_t, denoising_loss=denoise, proj_loss=torch.as_tensor(proj), denoising_loss_cls=denoise_cls)


@torch.no_grad()
def sampling_record(repo: Path, ema: torch.nn.Module) -> dict:
    _, _, samplers = _modules(repo)
    gen, noise = _latents(25)
    labels = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
    cls_noise = torch.randn(B, CLS_DIM, generator=gen)
    cases = {}
    for name, c in SAMPLING.items():
        torch.manual_seed(c["seed"])
        out = samplers.euler_maruyama_sampler(
            ema, noise.clone(), labels, num_steps=c["steps"], cfg_scale=c["cfg_scale"], guidance_low=c["low"],
            guidance_high=c["high"], path_type="linear", cls_latents=cls_noise.clone(),
            args=argparse.Namespace(cls_cfg_scale=c["cls_cfg_scale"]))
        cases[name] = dict(c, method="sde", out=out.to(torch.float64))
    return dict(noise=noise, labels=labels, cls_noise=cls_noise, cases=cases)


def write(out_dir: Path, repos: dict, commits: dict | None = None) -> list[Path]:
    if not need(repos, "reg", part="reg"):
        return []
    repo, out_dir = Path(repos["reg"]), Path(out_dir)
    ckpt, ema = checkpoint(repo)
    return [save_pt(ckpt, out_dir / "reg_checkpoint.pt"), save_pt(forward_record(ema), out_dir / "reg_io.pt"),
            save_pt(loss_record(repo, ema), out_dir / "reg_loss.pt"),
            save_pt(sampling_record(repo, ema), out_dir / "reg_sampling.pt")]
