"""The training loop: SiT or DiT, with or without REPA, on CPU, one GPU or DDP.

One step (global batch B over W processes, each with B/W samples)::

    images, labels ──► VAE posterior sample (or pixels in [-1, 1]) ──► x0: (b, C, H, W)
    images ─────────► frozen encoder ──► patch tokens z: (b, T, Dz)          (only when repa.proj_coeff > 0)
    t, ε, label dropout  (drawn for the GLOBAL batch from one seeded generator; each rank keeps rows rank::W)
    x_t = objective.add_noise(x0, t, ε);  out, zs~ = model(x_t, objective.model_time(t), y)
    loss = objective.loss(out, ...).mean() + proj_coeff · repa_loss(zs~, [z])
    backward → clip → AdamW → EMA        (train.grad_accum = k: forward/backward over k micro-batches first)

Drawing the randomness for the global batch makes a W-process run match the one-process run on the same
global batch (up to the order of floating-point reduction), and together with the stored generator states and
data position makes resume exact: N steps ≡ N/2 steps + resume + N/2 steps, bit for bit on the CPU.
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from repa_probe.training import rundir
from repa_probe.checkpoint import atomic_save, safe_load
from repa_probe.training.config import Config, to_dict, to_yaml
from repa_probe.training.distributed import DistInfo, cleanup_distributed, init_distributed
from repa_probe.training.builders import Batches, build_encoder, build_model, build_objective, model_inputs
from repa_probe.errors import ReproError

log = logging.getLogger("repa_probe")
CKPT_FORMAT = "repa-probe/1"


class TrainingDiverged(ReproError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def _device(cfg: Config, dist: DistInfo) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available; set train.device=cpu")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _autocast(cfg: Config, device: torch.device):
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _rng_state(gen: torch.Generator) -> dict:
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model over all parameters (frozen pos_embed included, as REPA)."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


class _StopFlag:
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
    """Everything one training step touches; ``build`` makes it from a config exactly as ``train`` does."""

    cfg: Config
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

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo, device: torch.device) -> "TrainState":
        torch.manual_seed(cfg.run.seed)
        batches = Batches(cfg, dist)
        enc = build_encoder(cfg, device)
        model = build_model(cfg, batches, enc).to(device)
        ema = build_model(cfg, batches, enc).to(device)
        ema.load_state_dict(model.state_dict())  # the EMA starts as an exact copy
        ema.requires_grad_(False).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.precision == "fp16")
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
        vae = batches.vae.to(device) if batches.vae is not None else None
        model.train()
        return cls(cfg, device, batches, enc, model, ema, build_objective(cfg), vae, params, opt, scaler, gen)


def step_module(s: TrainState, cfg: Config) -> torch.nn.Module:
    """What ``train_step`` calls: ``s.model``, or with ``train.compile`` a ``torch.compile`` of it (sharing its
    weights, so checkpoints keep the plain key names); the frozen target encoder is then compiled in place."""
    if not cfg.train.compile:
        return s.model
    if s.enc is not None:
        s.enc.compile()
    return torch.compile(s.model)


def train_step(s: TrainState, net: torch.nn.Module, cfg: Config, dist: DistInfo) -> dict:
    """One optimiser step on the next batch; returns detached scalar logs (no host sync but the NaN check).

    ``net`` is ``s.model`` or a wrapper of it (torch.compile, DDP). With ``train.grad_accum = k`` the batch runs
    as k equal micro-batches whose gradients add up to the full batch's (same samples, noise and labels as
    k = 1; DDP reduces once, on the last). Raises TrainingDiverged on a non-finite loss, before any weight
    changes.
    """
    from repa_probe.objectives import repa_loss

    device, obj = s.device, s.objective
    batch = s.batches.next()
    x0, z_enc, y = model_inputs(batch, s.vae, s.enc, device, s.gen, dist, cfg, s.model.grid_size,
                                enc_autocast=_autocast(cfg, device))  # frozen encoder under autocast, as REPA
    t, noise, y = objective_noise(obj, x0, y, s.gen, dist, cfg, s.batches.num_classes)
    x_t = obj.add_noise(x0, t, noise)
    k = cfg.train.grad_accum  # micro-batches: same samples and noise, gradients summed before the step
    micro = x0.shape[0] // k
    s.opt.zero_grad(set_to_none=True)
    sums: dict = {}
    for i in range(k):
        rows = slice(i * micro, (i + 1) * micro)
        sync = nullcontext() if i == k - 1 or not hasattr(net, "no_sync") else net.no_sync()  # DDP: reduce once
        with sync:
            with _autocast(cfg, device):
                out, zs_tilde = net(x_t[rows], obj.model_time(t[rows]), y[rows])
            terms = obj.loss(out.float(), x0[rows], x_t[rows], noise[rows], t[rows])
            loss = terms["loss"].mean()
            logs = {name: v.detach().mean() for name, v in terms.items()}
            if z_enc is not None:
                proj_loss, cos = repa_loss(zs_tilde, [z_enc[rows]])
                loss = loss + cfg.repa.proj_coeff * proj_loss
                logs.update(repa=proj_loss.detach(), cos=cos.detach())
            if not torch.isfinite(loss).item():
                raise TrainingDiverged(", ".join(f"{name}={v.item():.4g}" for name, v in logs.items()))
            s.scaler.scale(loss / k).backward()  # / 1 is exact: k = 1 is the plain step, bit for bit
        logs["total"] = loss.detach()
        sums = logs if not sums else {name: sums[name] + v for name, v in logs.items()}
    logs = {name: v / k for name, v in sums.items()}
    s.scaler.unscale_(s.opt)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(s.params, clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    update_ema(s.ema, s.model, cfg.train.ema_decay)
    logs["grad_norm"] = gnorm.detach()
    return logs


def train(cfg: Config) -> Path:
    """Train according to ``cfg``; returns the run directory. Raises on bad input or divergence."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    device_type = "cuda" if (cfg.train.device == "cuda" or
                             (cfg.train.device == "auto" and torch.cuda.is_available())) else "cpu"
    dist = init_distributed(device_type)
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed()


def _train(cfg: Config, dist: DistInfo) -> Path:
    device = _device(cfg, dist)
    if cfg.train.batch_size % (dist.world_size * cfg.train.grad_accum):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {dist.world_size} "
                         f"process(es) x train.grad_accum={cfg.train.grad_accum} micro-batches")
    run = rundir.prepare(cfg.run.out_dir, cfg.run.name)
    ckpt_dir = run / "checkpoints"
    handler = rundir.add_file_log(run) if dist.is_main else None
    if dist.is_main:
        (run / "config.yaml").write_text(to_yaml(cfg))
    if device.type == "cpu" and cfg.train.precision != "fp32":
        log.info("precision: train.precision=%s applies on GPU only; the CPU runs fp32", cfg.train.precision)

    s = TrainState.build(cfg, dist, device)
    batches, enc, model, ema, opt, scaler, gen = s.batches, s.enc, s.model, s.ema, s.opt, s.scaler, s.gen

    step = 0
    resumed = _resume(cfg, ckpt_dir)
    if resumed is not None:
        path, state = resumed
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(gen, state["rng"])
        batches.load_state_dict(state["data"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", path, step)
    if dist.is_main:
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, family %s, %d tokens; REPA %s; device %s; %d process(es)",
                 cfg.model.name, n / 1e6, model.family, model.num_tokens,
                 f"on (coeff {cfg.repa.proj_coeff}, block {cfg.repa.encoder_depth}, encoder "
                 f"{cfg.encoder.name})" if enc is not None else "off", device, dist.world_size)
    if step >= cfg.train.steps:
        log.info("nothing to do: already at step %d >= train.steps=%d", step, cfg.train.steps)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        return run

    net = step_module(s, cfg)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = rundir.MetricLogger(run, cfg.train.tensorboard) if dist.is_main else None
    stop = _StopFlag()
    stop.install()
    sums, count, t_last = None, 0, time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=step, desc=cfg.run.name, disable=not dist.is_main,
               dynamic_ncols=True, mininterval=1.0)
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bar
            while step < cfg.train.steps:
                try:
                    logs = train_step(s, net, cfg, dist)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(f"non-finite loss at step {step + 1} ({exc}); stopping; the last good "
                                           f"checkpoint is kept in {ckpt_dir}") from None
                step += 1
                bar.update(1)
                sums = {k: v.float() for k, v in logs.items()} if sums is None else \
                    {k: sums[k] + v.float() for k, v in logs.items()}
                count += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    sums, count, t_last = _log(step, sums, count, t_last, cfg, dist, metrics)
                stopping = _agree(stop.raised, dist, device)
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopping:
                    _save(step, model, ema, opt, scaler, gen, batches, cfg, ckpt_dir, dist)
                if stopping:
                    log.warning("stopped by signal at step %d; resume with train.resume=auto", step)
                    break
    finally:
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    return run


def objective_noise(objective, x0, y, gen, dist: DistInfo, cfg: Config, null_class):
    """Draw t, ε and dropped labels for the GLOBAL batch; keep this rank's rows (rank::world).

    x0: (b, C, H, W) local batch; y: (b,) labels. Returns t: (b,), noise: (b, C, H, W), y: (b,).
    """
    from repa_probe.objectives import drop_labels

    W = dist.world_size
    B = x0.shape[0] * W
    t = objective.sample_t(B, gen, x0.device)[dist.rank::W]
    noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=x0.device, dtype=x0.dtype)[dist.rank::W]
    if cfg.model.class_dropout_prob > 0:
        y_full = torch.zeros(B, dtype=y.dtype, device=y.device)
        y_full[dist.rank::W] = y
        y = drop_labels(y_full, cfg.model.class_dropout_prob, null_class, gen)[dist.rank::W]
    return t, noise, y


def _agree(flag: bool, dist: DistInfo, device) -> bool:
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t)
    return bool(t.item() > 0)


def _log(step, sums, count, t_last, cfg: Config, dist: DistInfo, metrics):
    vals = torch.stack(list(sums.values())) / count
    if dist.enabled:
        torch_dist.all_reduce(vals)
        vals = vals / dist.world_size
    now = time.perf_counter()
    values = dict(zip(sums.keys(), vals.tolist()))
    values["images_per_s"] = count * cfg.train.batch_size / max(now - t_last, 1e-9)
    if dist.is_main:
        line = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.info("step %7d %s", step, line)
        metrics.log(step, values)
    return None, 0, now


def _resume(cfg: Config, ckpt_dir: Path):
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        return rundir.load_latest(ckpt_dir, _load_train_ckpt)
    return Path(mode), _load_train_ckpt(Path(mode))


def _load_train_ckpt(path: Path) -> dict:
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a repa-probe training checkpoint (no format={CKPT_FORMAT!r})")
    return state


def _save(step, model, ema, opt, scaler, gen, batches, cfg, ckpt_dir: Path, dist: DistInfo):
    if dist.is_main:
        state = {"format": CKPT_FORMAT, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                 "opt": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rng": _rng_state(gen), "data": batches.state_dict(), "config": to_dict(cfg),
                 "model_config": dict(model.config)}
        path = rundir.checkpoint_path(ckpt_dir, step)
        atomic_save(state, path)
        removed = rundir.prune(ckpt_dir, cfg.train.keep_last, cfg.train.keep_every)
        log.info("saved checkpoint %s%s", path, f" (pruned {len(removed)})" if removed else "")
    if dist.enabled:
        torch_dist.barrier()
