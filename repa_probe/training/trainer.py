"""The training loop: SiT or DiT, with or without REPA, on CPU, one GPU or DDP.

One step (global batch B over W processes, each with B/W samples)::

    images, labels ──► VAE posterior sample (or pixels in [-1, 1]) ──► x0: (b, C, H, W)
    images ─────────► frozen encoder ──► patch tokens z: (b, T, Dz) (REPA, REG, HASTE only)
    t, ε, label dropout  (drawn for the GLOBAL batch from one seeded generator; each rank keeps rows rank::W)
    x_t = objective.add_noise(x0, t, ε);  out, zs~ = model(x_t, objective.model_time(t), y)
    loss = objective.loss(out, ...).mean() + proj_coeff · repa_loss(zs~, [z])  (+ REG / HASTE terms: training.family)
    backward → clip → AdamW → EMA        (train.grad_accum = k: forward/backward over k micro-batches first)

Drawing the randomness for the global batch makes a W-process run match the one-process run on the same
global batch (up to the order of floating-point reduction), and together with the stored generator states and
data position makes resume exact: N steps ≡ N/2 steps + resume + N/2 steps, bit for bit on the CPU.

The step never reads a value back to the host: losses are summed on the device and a non-finite loss is
recorded there (the first such step); :func:`raise_if_diverged` reads it every ``train.log_every`` steps and
before every checkpoint, and stops the run naming the step. :class:`~repa_probe.training.state.TrainState` owns everything a step
touches and its checkpoint (``state_dict`` / ``load_state_dict``); ``training.rundir`` decides where
checkpoints go and which are kept; ``repa_probe.checkpoint`` writes and reads the files.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from repa_probe.checkpoint import load_training_checkpoint
from repa_probe.devices import resolve_device
from repa_probe.errors import ReproError
from repa_probe.objectives import drop_labels
from repa_probe.training import rundir
from repa_probe.training.accel import autocast_for, check_flash_attention, prepare_step_modules
from repa_probe.training.builders import model_inputs
from repa_probe.training.config import Config, ConfigError, to_dict, to_yaml
from repa_probe.training.family import StepBatch, aligning, class_token_noise, extra_terms, model_kwargs
from repa_probe.training.distributed import DistInfo, agree, cleanup_distributed, init_distributed
from repa_probe.training.e2e import LOSS_NAMES, e2e_step
from repa_probe.training.state import StopFlag, TrainState, update_ema  # noqa: F401 (update_ema: public here too)

log = logging.getLogger("repa_probe")


class TrainingDiverged(ReproError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def _device(cfg: Config, dist: DistInfo) -> torch.device:
    """``train.device`` read by the shared :func:`~repa_probe.devices.resolve_device`; CUDA: this process's
    local GPU."""
    dev = resolve_device(cfg.train.device, "train.device")
    return torch.device("cuda", dist.local_rank) if dev.type == "cuda" else dev


def _micro_loss(s: TrainState, b: StepBatch, align: bool) -> tuple:
    """Loss of one micro-batch (rows of the step's tensors) and its detached log terms."""
    obj = s.objective
    kwargs = model_kwargs(s.model, obj, b)
    with autocast_for(s.cfg, s.device):
        outputs = s.net(b.x_t, obj.model_time(b.t), b.y, **kwargs)
    terms = obj.loss(outputs[0].float(), b.x0, b.x_t, b.noise, b.t)
    logs = {name: v.detach().mean() for name, v in terms.items()}
    extra, extra_logs = extra_terms(s.cfg, obj, outputs, b, kwargs, s.taps, align)
    loss = terms["loss"].mean() + extra
    logs.update(extra_logs)
    logs["total"] = loss.detach()
    return loss, logs


def train_step(s: TrainState) -> dict:
    """One optimiser step on the next batch; returns detached scalar logs on the device (no host sync).

    ``vae.tune=true``: REPA-E's step (:func:`repa_probe.training.e2e.e2e_step`: VAE, discriminator and
    diffusion model, three optimisers). A model with a latent BatchNorm normalises the clean latents with it.

    Calls ``s.net`` (the model, compiled or DDP-wrapped). With ``train.grad_accum = k`` the batch runs as k
    equal micro-batches whose gradients add up to the full batch's (same samples, noise and labels as k = 1;
    DDP reduces once, on the last). A non-finite loss is recorded in ``s.first_bad`` (read by
    :func:`raise_if_diverged`); the step itself never stops on it.
    """
    if s.e2e is not None:
        return _finish_step(s, *e2e_step(s, objective_noise))
    cfg, obj = s.cfg, s.objective
    batch = s.batches.next()
    align = aligning(cfg, s.step)  # HASTE: no alignment (and no encoder, unless REG needs its class token) later
    enc = s.enc_net if align or cfg.reg.cls_coeff > 0 else None
    x0, z_enc, y = model_inputs(batch, s.vae, enc, s.device, s.gen, s.dist, cfg, s.model.grid_size,
                                enc_autocast=autocast_for(cfg, s.device))  # frozen encoder under autocast, as REPA
    t, noise, y = objective_noise(obj, x0, y, s.gen, s.dist, cfg, s.batches.num_classes)
    if s.model.bn is not None:  # REPA-E's latent BatchNorm (train mode: batch statistics)
        x0 = s.model.bn(x0)
    b = StepBatch(obj.add_noise(x0, t, noise), t, y, x0, noise, z_enc,
                  class_token_noise(z_enc, s.gen, s.dist) if s.model.cls_token_dim else None,
                  s.taps.teacher.logits(s.taps.heads) if s.taps is not None and align else None)
    k = cfg.train.grad_accum  # micro-batches: same samples and noise, gradients summed before the step
    micro = x0.shape[0] // k
    s.opt.zero_grad(set_to_none=True)
    sums: dict = {}
    for i in range(k):
        r = slice(i * micro, (i + 1) * micro)
        sync = nullcontext() if i == k - 1 or not hasattr(s.net, "no_sync") else s.net.no_sync()  # DDP: reduce once
        with sync:
            loss, logs = _micro_loss(s, b.rows(r), align)
            s.scaler.scale(loss / k).backward()  # / 1 is exact: k = 1 is the plain step, bit for bit
        sums = logs if not sums else {name: sums[name] + v for name, v in logs.items()}
    logs = {name: v / k for name, v in sums.items()}
    s.scaler.unscale_(s.opt)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(s.params, clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    logs["grad_norm"] = gnorm.detach()
    return _finish_step(s, logs, logs["total"].reshape(1))


def _finish_step(s: TrainState, logs: dict, losses: torch.Tensor) -> dict:
    """EMA, step count, and the first non-finite step with the index of its first bad loss (on the device)."""
    update_ema(s.ema, s.model, s.cfg.train.ema_decay)
    s.step += 1
    finite = torch.isfinite(losses)
    new = ~finite.all() & (s.first_bad == 0)
    s.first_bad = torch.where(new, s.step, s.first_bad)  # first non-finite step, recorded on the device
    s.bad_term = torch.where(new, (~finite).int().argmax(), s.bad_term)
    return logs


def raise_if_diverged(s: TrainState) -> None:
    """Raise TrainingDiverged if a loss since the last check was not finite (one host read; DDP ranks agree)."""
    first = s.first_bad
    if s.dist.enabled:
        never = torch.iinfo(torch.int64).max
        first = torch.where(first > 0, first, never).reshape(1)
        torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        first = torch.where(first == never, 0, first)
    bad, lo = int(first.item()), s.checked + 1
    s.checked = s.step
    if bad:
        what = LOSS_NAMES[int(s.bad_term.item())] if s.e2e is not None and s.first_bad.item() == bad else "loss"
        raise TrainingDiverged(f"non-finite {what} at step {bad} (checked steps {lo}-{s.step}: the loss is checked "
                               f"every train.log_every={s.cfg.train.log_every} steps and before each checkpoint)")


def train(cfg: Config) -> Path:
    """Train according to ``cfg``; returns the run directory. Raises on bad input or divergence."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    dist = init_distributed(resolve_device(cfg.train.device, "train.device").type)
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed()


def _start(cfg: Config, dist: DistInfo) -> tuple:
    """Run directory, file log, state (resumed when a checkpoint exists). Returns (run, handler, state)."""
    device = _device(cfg, dist)
    if cfg.train.batch_size % (dist.world_size * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {dist.world_size} "
                         f"process(es) x train.grad_accum={cfg.train.grad_accum} micro-batches")
    run_path = Path(cfg.run.out_dir) / cfg.run.name
    rundir.check_same_run(run_path, to_dict(cfg))
    made = next((p for p in [*reversed(run_path.parents), run_path] if not p.exists()), None)  # made by this start
    run = rundir.prepare(cfg.run.out_dir, cfg.run.name)
    handler = rundir.add_file_log(run) if dist.is_main else None
    try:
        if device.type == "cpu" and cfg.train.precision != "fp32":
            log.info("precision: train.precision=%s applies on GPU only; the CPU runs fp32", cfg.train.precision)
        s = TrainState.build(cfg, dist, device)
        resumed = _resume(cfg, run / "checkpoints")
    except BaseException:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if made is not None and dist.is_main:  # a failed start leaves no half-made run folder
            rundir.remove_new_run(run, made)
        raise
    if dist.is_main:
        (run / "config.yaml").write_text(to_yaml(cfg))
    if resumed is not None:
        path, state = resumed
        s.load_state_dict(state)
        log.info("resumed from %s at step %d", path, s.step)
    if dist.is_main:
        n = sum(p.numel() for p in s.model.parameters())
        log.info("model %s: %.2fM parameters, family %s, %d tokens; REPA %s; device %s; %d process(es)",
                 cfg.model.name, n / 1e6, s.model.family, s.model.num_tokens,
                 f"on (coeff {cfg.repa.proj_coeff}, block {cfg.repa.encoder_depth}, encoder "
                 f"{cfg.encoder.name})" if s.enc is not None else "off", device, dist.world_size)
    return run, handler, s


def _train(cfg: Config, dist: DistInfo) -> Path:
    run, handler, s = _start(cfg, dist)
    try:
        if s.step >= cfg.train.steps:
            log.info("nothing to do: already at step %d >= train.steps=%d", s.step, cfg.train.steps)
            return run
        check_flash_attention(cfg, s.model, s.device)
        prepare_step_modules(s)
        if s.e2e is not None:
            s.e2e.prepare(s.dist, s.device)
        _loop(s, run / "checkpoints", rundir.MetricLogger(run, cfg.train.tensorboard) if dist.is_main else None)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    return run


def _loop(s: TrainState, ckpt_dir: Path, metrics) -> None:
    """Steps until ``train.steps`` or a stop signal: log, check the loss, checkpoint."""
    cfg = s.cfg
    stop = StopFlag()
    stop.install()
    sums, count, t_last = None, 0, time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=s.step, desc=cfg.run.name, disable=not s.dist.is_main,
               dynamic_ncols=True, mininterval=1.0)
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bar
            while s.step < cfg.train.steps:
                logs = train_step(s)
                bar.update(1)
                sums = {k: v.float() for k, v in logs.items()} if sums is None else \
                    {k: sums[k] + v.float() for k, v in logs.items()}
                count += 1
                last, stopping = s.step == cfg.train.steps, agree(stop.raised, s.dist)
                do_log = s.step % cfg.train.log_every == 0 or last
                do_save = s.step % cfg.train.ckpt_every == 0 or last or stopping
                if do_log or do_save:
                    try:
                        raise_if_diverged(s)
                    except TrainingDiverged as exc:
                        raise TrainingDiverged(f"{exc}; stopping; the last good checkpoint is kept in "
                                               f"{ckpt_dir}") from None
                if do_log:
                    sums, count, t_last = _log(s.step, sums, count, t_last, cfg, s.dist, metrics)
                if do_save:
                    _save(s, ckpt_dir)
                if stopping:
                    log.warning("stopped by signal at step %d; resume with train.resume=auto", s.step)
                    break
    finally:
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()


def objective_noise(objective, x0, y, gen, dist: DistInfo, cfg: Config, null_class):
    """Draw t, ε and dropped labels for the GLOBAL batch; keep this rank's rows (rank::world).

    x0: (b, C, H, W) local batch; y: (b,) labels. Returns t: (b,), noise: (b, C, H, W), y: (b,).
    """
    W = dist.world_size
    B = x0.shape[0] * W
    t = objective.sample_t(B, gen, x0.device)[dist.rank::W]
    noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=x0.device, dtype=x0.dtype)[dist.rank::W]
    if cfg.model.class_dropout_prob > 0:
        y_full = torch.zeros(B, dtype=y.dtype, device=y.device)
        y_full[dist.rank::W] = y
        y = drop_labels(y_full, cfg.model.class_dropout_prob, null_class, gen)[dist.rank::W]
    return t, noise, y


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
    """(path, state) of the checkpoint to resume from per ``train.resume``, or None to start fresh."""
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        return rundir.load_latest(ckpt_dir, load_training_checkpoint)
    return Path(mode), load_training_checkpoint(mode)


def _save(s: TrainState, ckpt_dir: Path) -> None:
    """Rank 0 writes the checkpoint of ``s`` (retention per train.keep_last / keep_every); all ranks wait."""
    if s.dist.is_main:
        path, removed = rundir.save_checkpoint(ckpt_dir, s.step, s.state_dict(), s.cfg.train.keep_last,
                                               s.cfg.train.keep_every)
        log.info("saved checkpoint %s%s", path, f" (pruned {len(removed)})" if removed else "")
    if s.dist.enabled:
        torch_dist.barrier()
