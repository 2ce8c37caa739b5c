"""Golden part "losses": DiT's ``training_losses``, REPA's ``SILoss`` and SiT's transport loss on fixed inputs.

The models are the "models" part's golden models (same seeds, so the same weights as the committed state
dicts). Files:

* ``dit_losses.pt``: ``x0, t (steps 0, 1, 250, 999), noise, y``; ``x_t`` (their ``q_sample``), ``model_out``
  (the raw 2C-channel output their loss saw) and the terms ``loss, mse, vb`` of
  ``create_diffusion("").training_losses(model, x0, t, dict(y=y), noise)``.
* ``repa_siloss_{linear,cosine}.pt``: ``x0, y, zs`` (encoder tokens, one per projector: the projector
  outputs at t = 0.5 plus noise), the time ``t: (B,)`` and ``noise`` that ``SILoss`` drew (read back by
  replaying the global RNG and checked against the model input it passed), ``x_t, model_out, zs_tilde``,
  ``denoising_loss: (B,)`` and ``proj_loss`` (scalar).
* ``sit_transport_loss.pt``: willisma/SiT ``create_transport("Linear", "velocity").training_losses``: ``x1``
  (data), ``y``, ``t_sit`` (SiT time, t=0 noise), ``noise`` (their x0), ``x_t``, ``model_out``, ``loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tools.golden import models
from tools.golden.common import GoldenError, import_file, need, save_pt, seed_all, stub_modules

LOSS_SEED = 7


class _Recorder:
    """Wraps a model and records the (x_t, t) it is called with and what it returns."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        self.calls.append((x.detach().clone(), t.detach().clone(), out))
        return out


def _check_replay(name: str, recorded: torch.Tensor, rebuilt: torch.Tensor) -> None:
    if not torch.equal(recorded, rebuilt):
        raise GoldenError(f"{name}: replaying the RNG does not reproduce the model input their loss built "
                          f"(max diff {(recorded - rebuilt).abs().max().item():.3g}); did their draw order change?")


@torch.no_grad()
def dit_losses(repos: dict[str, Path]) -> dict:
    """DiT's hybrid loss terms for fixed x0, t, noise, y."""
    diffusion_pkg = import_file("golden_dit_diffusion", Path(repos["dit"]) / "diffusion")
    model = models.build("dit", repos)
    gen = torch.Generator().manual_seed(LOSS_SEED)
    x0 = torch.randn(models.BATCH, 4, 16, 16, generator=gen) * 0.7  # some values beyond ±0.999: edge bins at t=0
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 250, 999], dtype=torch.int64)
    y = torch.tensor([1, models.NUM_CLASSES, 5, 2], dtype=torch.int64)
    diffusion = diffusion_pkg.create_diffusion(timestep_respacing="")
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        terms = diffusion.training_losses(model, x0, t, model_kwargs=dict(y=y), noise=noise)
    finally:
        hook.remove()
    return dict(x0=x0, t=t, noise=noise, y=y, x_t=diffusion.q_sample(x0, t, noise=noise), model_out=seen[0],
                **{k: terms[k] for k in ("loss", "mse", "vb")})


@torch.no_grad()
def repa_siloss(repos: dict[str, Path], path_type: str) -> dict:
    """REPA's SILoss (prediction v, uniform t) on the golden REPA model; t and noise drawn by SILoss itself."""
    loss_mod = import_file("golden_repa_loss", Path(repos["repa"]) / "loss.py")
    model = models.build("repa", repos)
    config = models.CONFIGS["repa"][1]
    gen = torch.Generator().manual_seed(LOSS_SEED + 1)
    s = config["input_size"]
    x0 = torch.randn(models.BATCH, config["in_channels"], s, s, generator=gen)
    y = torch.tensor([0, 7, models.NUM_CLASSES, 3], dtype=torch.int64)
    # encoder tokens that partly agree with the projectors (cos ~ 0.5, like a trained run): the model's own
    # projected tokens at t = 0.5 plus noise of the same scale
    _, own = model(x0, torch.full((models.BATCH,), 0.5), y)
    zs = [z + z.std() * torch.randn(z.shape, generator=gen) for z in own]
    loss = loss_mod.SILoss(prediction="v", path_type=path_type, weighting="uniform")
    recorder = _Recorder(model)
    seed_all(LOSS_SEED + 2)
    denoising_loss, proj_loss = loss(recorder, x0, model_kwargs=dict(y=y), zs=zs)
    x_t, t, (model_out, zs_tilde) = recorder.calls[0]
    seed_all(LOSS_SEED + 2)  # replay their draws: t = rand((B, 1, 1, 1)), then noise = randn_like(x0)
    t_drawn = torch.rand((x0.shape[0], 1, 1, 1))
    noise = torch.randn_like(x0)
    alpha, sigma, _, _ = loss.interpolant(t_drawn)
    _check_replay(f"SILoss({path_type})", x_t, alpha * x0 + sigma * noise)
    _check_replay(f"SILoss({path_type}) time", t, t_drawn.flatten())
    return dict(x0=x0, y=y, zs=zs, t=t, noise=noise, x_t=x_t, model_out=model_out, zs_tilde=list(zs_tilde),
                denoising_loss=denoising_loss, proj_loss=torch.as_tensor(proj_loss))


@torch.no_grad()
def sit_transport_loss(repos: dict[str, Path]) -> dict:
    """willisma/SiT's Linear / velocity transport loss on the golden SiT model (SiT time: t=0 noise)."""
    with stub_modules("torchdiffeq", **{"torchdiffeq.odeint": None}):  # only their ODE sampler uses it
        transport_pkg = import_file("golden_sit_transport", Path(repos["sit"]) / "transport")
    model = models.build("sit", repos)
    config = models.CONFIGS["sit"][1]
    gen = torch.Generator().manual_seed(LOSS_SEED + 3)
    s = config["input_size"]
    x1 = torch.randn(models.BATCH, config["in_channels"], s, s, generator=gen)
    y = torch.tensor([4, models.NUM_CLASSES, 0, 9], dtype=torch.int64)
    transport = transport_pkg.create_transport("Linear", "velocity")
    recorder = _Recorder(model)
    seed_all(LOSS_SEED + 4)
    terms = transport.training_losses(recorder, x1, model_kwargs=dict(y=y))
    x_t, t_sit, model_out = recorder.calls[0]
    seed_all(LOSS_SEED + 4)  # replay: x0 = randn_like(x1), then t = rand(B)
    noise = torch.randn_like(x1)
    t_drawn = torch.rand((x1.shape[0],))
    _check_replay("SiT transport", x_t, t_drawn[:, None, None, None] * x1 + (1 - t_drawn[:, None, None, None]) * noise)
    return dict(x1=x1, y=y, t_sit=t_sit, noise=noise, x_t=x_t, model_out=model_out, loss=terms["loss"])


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Write every loss record whose repos were given."""
    out_dir, written = Path(out_dir), []
    if need(repos, "dit", part="losses:dit"):
        written.append(save_pt(dit_losses(repos), out_dir / "dit_losses.pt"))
    if need(repos, "repa", part="losses:repa"):
        for path_type in ("linear", "cosine"):
            written.append(save_pt(repa_siloss(repos, path_type), out_dir / f"repa_siloss_{path_type}.pt"))
    if need(repos, "sit", part="losses:sit"):
        written.append(save_pt(sit_transport_loss(repos), out_dir / "sit_transport_loss.pt"))
    return written
