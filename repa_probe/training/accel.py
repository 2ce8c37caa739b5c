"""How the training step runs fast: autocast, ``train.compile`` (with a measured fallback), the attention kernel.

* ``train.compile=auto`` (default) compiles the model and the frozen target encoder with ``torch.compile`` on
  CUDA and runs eager on the CPU (where compiling costs ~30 s and gains nothing, ``docs/benchmarks.md``);
  ``true`` / ``false`` force it. Compilation happens in :func:`prepare_step_modules`, on one forward + backward
  of zero inputs of the real micro-batch shape, so a compiler failure is caught there: the run then trains
  eager, with one warning line. The compile time is logged.
* :func:`check_flash_attention`: on CUDA with bf16 / fp16, one tiny SDPA call restricted to the flash backend
  tells once, at start, whether attention (``F.scaled_dot_product_attention`` in ``models/layers.py``) takes
  the flash kernel for this head size, or falls back to a slower one.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from repa_probe.errors import error_summary
from repa_probe.training.builders import encoder_kind
from repa_probe.training.config import Config

log = logging.getLogger("repa_probe")


def autocast_for(cfg: Config, device: torch.device):
    """bf16 / fp16 autocast on CUDA per ``train.precision``; a no-op on the CPU (which trains fp32)."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def want_compile(cfg: Config, device: torch.device) -> bool:
    """``train.compile``: ``true`` / ``false``, or ``auto`` = compile on CUDA only."""
    mode = cfg.train.compile
    return device.type == "cuda" if mode == "auto" else mode == "true"


def _warm_up(s) -> None:
    """One forward + backward of ``s.net`` (and a forward of ``s.enc_net``) on zero inputs of the real
    micro-batch shape, dtypes and grad modes: torch.compile compiles here, and the steps reuse the graphs
    (no recompilation). Draws nothing from the run's generators, leaves the
    weights and the optimiser untouched and clears the gradients."""
    cfg, m, dev = s.cfg, s.model, s.device
    b = s.batches.local_batch // cfg.train.grad_accum
    x = torch.zeros(b, m.in_channels, m.input_size, m.input_size, device=dev)  # (b, C, H, W)
    t = s.objective.model_time(s.objective.sample_t(b, torch.Generator(dev).manual_seed(0), dev))
    y = torch.zeros(b, dtype=torch.int64, device=dev)
    kw = {"cls_token": torch.zeros(b, m.cls_token_dim, device=dev)} if m.cls_token_dim else {}  # REG
    with autocast_for(cfg, dev):
        if s.enc_net is not None:
            r = cfg.data.resolution
            with torch.no_grad():  # as builders.model_inputs calls it (grad mode is part of the compiled graph)
                s.enc_net(torch.zeros(b, 3, r, r, dtype=torch.uint8, device=dev), encoder_kind(cfg))
        out, zs, *extra = s.net(x, t, y, **kw)
        loss = out.float().mean() + sum(z.float().mean() for z in [*zs, *extra])
    loss.backward()
    s.opt.zero_grad(set_to_none=True)


def prepare_step_modules(s) -> None:
    """Set ``s.net`` / ``s.enc_net`` (what the step calls): the model and the encoder, compiled when
    :func:`want_compile` says so (falling back to eager with one warning if compiling fails), and the model
    wrapped in DDP for a multi-process run. The compiled modules share the weights, so checkpoints keep the
    plain key names."""
    s.net, s.enc_net = s.model, s.enc
    if want_compile(s.cfg, s.device):
        s.net = torch.compile(s.model)
        s.enc_net = torch.compile(s.enc) if s.enc is not None else None
        start = time.perf_counter()
        try:
            _warm_up(s)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: train eager, say so once
            s.opt.zero_grad(set_to_none=True)
            s.net, s.enc_net = s.model, s.enc
            log.warning("WARNING: torch.compile failed after %.1f s (%s); training eager (train.compile=false "
                        "skips the attempt)", time.perf_counter() - start, error_summary(exc, limit=200))
        else:
            log.info("torch.compile: model%s compiled in %.1f s (first forward + backward)",
                     " and encoder" if s.enc is not None else "", time.perf_counter() - start)
    if s.dist.enabled:
        s.net = torch.nn.parallel.DistributedDataParallel(  # HASTE's switch-off leaves the projectors unused
            s.net, device_ids=[s.device.index] if s.device.type == "cuda" else None,
            find_unused_parameters=s.cfg.haste.stop_step is not None)


def check_flash_attention(cfg: Config, model, device: torch.device):
    """On CUDA with bf16 / fp16: True if SDPA's flash kernel runs for the model's head size (logged once),
    False (with a warning) if it does not; None elsewhere (CPU or fp32: no flash kernel to check)."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    head_dim = model.hidden_size // model.num_heads
    q = torch.zeros(1, model.num_heads, model.num_tokens, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        log.warning("WARNING: flash attention is not usable here (%s); SDPA falls back to a slower kernel",
                    error_summary(exc, limit=200))
        return False
    log.info("attention: flash SDPA kernel in use (%d heads of %d, %s)", model.num_heads, head_dim,
             str(dtype).replace("torch.", ""))
    return True
