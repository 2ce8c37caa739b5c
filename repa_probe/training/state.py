"""What one training step touches and what its checkpoint holds: :class:`TrainState` (built from a config exactly
as ``train`` builds it; ``state_dict`` / ``load_state_dict`` are the training checkpoint), the EMA update and
the stop flag SIGTERM / SIGUSR1 raise. The loop that drives it is :mod:`repa_probe.training.trainer`."""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch

from repa_probe.checkpoint import CHECKPOINT_FORMAT, CheckpointError
from repa_probe.training.builders import Batches, build_encoder, build_model, build_objective
from repa_probe.training.config import Config, to_dict
from repa_probe.training.distributed import DistInfo
from repa_probe.training.e2e import E2EParts, build_e2e
from repa_probe.training.family import AttentionTaps, build_attention_taps

log = logging.getLogger("repa_probe")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model over all parameters (frozen pos_embed included, as REPA):
    one ``torch._foreach_lerp_`` over the parameter lists (a few fused kernels, no per-tensor Python loop).
    Float buffers (REPA-E's latent BatchNorm statistics) are averaged too, others copied (REPA-E's EMA)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point():
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


class StopFlag:
    """Set by SIGTERM / SIGUSR1: save a checkpoint at the end of the current step and exit cleanly."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): signals stay default
                pass

    def _handle(self, signum, frame):
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.raised = True

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class TrainState:
    """Everything one training step touches, and its checkpoint.

    ``build`` makes it from a config exactly as ``train`` does; ``net`` / ``enc_net`` are what the step calls
    (the model and encoder themselves, compiled, or DDP-wrapped: ``accel.prepare_step_modules``).
    ``first_bad``: 0-d int64 on the device, the first step whose loss was not finite (0 = none yet);
    ``checked``: the last step :func:`raise_if_diverged` looked at. ``taps``: HASTE's attention hooks, or None.
    """

    cfg: Config
    dist: DistInfo
    device: torch.device
    batches: Batches
    enc: Optional[torch.nn.Module]
    model: torch.nn.Module
    ema: torch.nn.Module
    objective: object
    vae: Optional[torch.nn.Module]
    params: list
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    net: Optional[torch.nn.Module] = None
    enc_net: Optional[torch.nn.Module] = None
    e2e: Optional[E2EParts] = None  # vae.tune=true (REPA-E): the trained VAE, discriminator, their optimisers
    step: int = 0
    checked: int = 0
    first_bad: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    bad_term: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    taps: Optional[AttentionTaps] = None

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo, device: torch.device) -> "TrainState":
        """Data, encoder, model, EMA (an exact copy), fused AdamW, scaler and generator; eager step modules."""
        torch.manual_seed(cfg.run.seed)
        batches = Batches(cfg, dist, pin_memory=device.type == "cuda")
        enc = build_encoder(cfg, device)
        model = build_model(cfg, batches, enc).to(device)
        ema = build_model(cfg, batches, enc).to(device)
        ema.load_state_dict(model.state_dict())  # the EMA starts as an exact copy
        ema.requires_grad_(False).eval()
        if cfg.vae.tune:  # REPA-E trains pos_embed too: its requires_grad(model, True) after the VAE step
            model.pos_embed.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.precision == "fp16")
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
        vae = batches.vae.to(device) if batches.vae is not None else None
        model.train()
        e2e = build_e2e(cfg, vae, device) if cfg.vae.tune else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return cls(cfg, dist, device, batches, enc, model, ema, build_objective(cfg), vae, params, opt, scaler,
                   gen, net=model, enc_net=enc, e2e=e2e, first_bad=zero, bad_term=zero.clone(),
                   taps=build_attention_taps(cfg, model, enc))

    def _rng_state(self) -> dict:
        state = {"generator": self.gen.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict:
        """The training checkpoint: model, EMA, optimiser, scaler, RNG, data position, step, config,
        model_config (constructor keywords, for ``checkpoint.load_model``) and ``format``."""
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": self._rng_state(), "data": self.batches.state_dict(), "config": to_dict(self.cfg),
                "model_config": self.model.config, **(self.e2e.state_dict() if self.e2e is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (in place: compiled / DDP wrappers keep working)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a repa-probe training checkpoint (format {state.get('format')!r}, "
                                  f"expected {CHECKPOINT_FORMAT!r})")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        if self.e2e is not None:
            if "opt_vae" not in state:
                raise CheckpointError("vae.tune=true cannot resume from a checkpoint without the VAE's training state")
            self.e2e.load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        self.gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.batches.load_state_dict(state["data"])
        self.step = self.checked = int(state["step"])
