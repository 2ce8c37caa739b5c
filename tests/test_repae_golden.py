"""REPA-E against golden files written by its own code (``tools/golden/repae.py``): the SiT with its latent
BatchNorm, the LDM-layout VAE and its statistics, a ``train_repae.py`` checkpoint, one end-to-end step. 1e-5."""

import argparse
from types import SimpleNamespace

import torch

from repa_probe.checkpoint import load_model
from repa_probe.encoders.discriminator import PatchDiscriminator
from repa_probe.encoders.ldm_vae import build_from_ldm, ldm_to_diffusers
from repa_probe.encoders.vae import load_vae
from repa_probe.encoders.vae_losses import VAELossWeights
from repa_probe.objectives import FlowMatching, repa_loss
from repa_probe.training import e2e
from repa_probe.training.config import load_config
from repa_probe.training.trainer import update_ema
from test_golden import GOLDEN, _close, _golden  # tests/ is on sys.path (pytest's rootdir import mode)

NULL = 10


def test_repae_model_bn_forward_and_inference_match_official():
    io = _golden("repae_io.pt")
    model, info = load_model(GOLDEN / "repae_state_dict.pt", encoder_depth=2, num_heads=2)
    assert info.time_convention == "repa" and model.config["bn_momentum"] == 0.1 and model.patch_size == 1
    assert not model.bn.training and model.in_channels == 32
    with torch.no_grad():
        xn = model.bn(io["x"])  # eval: running statistics, eps 1e-4
        t = io["t"]
        x_t = FlowMatching().add_noise(xn, t, io["noise"])
        out, zs = model(x_t, t, io["y"])
        _close(out, io["model_output"], "model_output")
        _close(zs[0], io["zs_tilde"][0], "zs_tilde")
        _close(((out - (io["noise"] - xn)) ** 2).mean((1, 2, 3)), io["denoising_loss"], "denoising_loss")
        _close(repa_loss(zs, io["zs"])[0], io["proj_loss"], "proj_loss")
        _close(model(io["x"], t, io["y"])[0], io["inference"], "inference")


def test_repae_vae_file_with_latent_stats_matches_official():
    io = _golden("repae_vae_io.pt")
    stats = _golden("repae_vae-latents-stats.pt")
    vae = load_vae(GOLDEN / "repae_vae.pt")
    assert (vae.latent_channels, vae.downsample_factor) == (32, 4)
    moments = vae.encode_moments(io["images"])
    _close(moments[:, :32], io["mean"], "posterior mean")
    _close(moments[:, 32:], io["std"], "posterior std")
    with torch.no_grad():
        _close(vae.vae.decode(io["z"]).sample, io["decoded"], "decode")
    raw = io["mean"]
    expected = (raw - stats["latents_bias"]) * stats["latents_scale"]  # REPA-E's normalize_latents
    _close(vae.normalize(raw), expected, "normalised latents")
    _close(vae.denormalize(expected), raw, "de-normalised latents")
    _close(vae.latent_stats()["latents_scale"], stats["latents_scale"], "latents_scale")


def test_train_repae_checkpoint_loads_with_ema_and_bn(tmp_path):
    rec = _golden("repae_train.pt")
    model_sd = _golden("repae_state_dict.pt")
    ckpt = {"model": rec["after"]["model"], "ema": {**model_sd, **rec["after"]["ema"]},
            "vae": _golden("repae_vae.pt"), "discriminator": rec["before"]["discriminator"], "opt": {},
            "opt_vae": {}, "opt_disc": {}, "args": argparse.Namespace(**rec["args"]), "steps": 1}
    path = tmp_path / "0000001.pt"
    torch.save(ckpt, path)
    model, info = load_model(path, num_heads=2)
    assert info.source_format == "official-training" and info.ema and info.step == 1
    assert info.time_convention == "repa" and model.encoder_depth == rec["args"]["encoder_depth"] == 2
    assert not model.bn.training
    _close(model.bn.running_var, rec["after"]["ema"]["bn.running_var"], "EMA bn.running_var")
    assert int(model.bn.num_batches_tracked) == 1


def _state(rec):
    """What e2e_update touches, built from the golden 'before' state (REPA-E's recipe: lr 1e-4, clip 1)."""
    cfg = load_config(None, ["optim.lr=1e-4", "repa.vae_coeff=1.5", "repa.proj_coeff=0.5"])
    model, _ = load_model(GOLDEN / "repae_state_dict.pt", encoder_depth=2, num_heads=2)
    model.train().pos_embed.requires_grad_(True)  # as TrainState.build with vae.tune (REPA-E trains it)
    vae = build_from_ldm(_golden("repae_vae.pt"))
    disc = PatchDiscriminator(ndf=rec["disc_ndf"])
    disc.load_state_dict(rec["before"]["discriminator"])
    parts = e2e.E2EParts(vae, disc.train(), None, VAELossWeights(perceptual=0.0),
                         e2e._adamw(vae.parameters(), 1e-4, cfg),
                         e2e._adamw(disc.parameters(), 1e-4, cfg), e2e.VAEForward(vae), disc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True)
    ema = load_model(GOLDEN / "repae_state_dict.pt", encoder_depth=2, num_heads=2)[0]
    return SimpleNamespace(cfg=cfg, model=model, net=model, params=params, opt=opt, objective=FlowMatching(),
                           e2e=parts, device=torch.device("cpu"), step=0, ema=ema)


def test_one_end_to_end_step_matches_train_repae():
    rec = _golden("repae_train.pt")
    s = _state(rec)
    d, inp = rec["draws"], rec["inputs"]
    y_drop = torch.where(d["drop"], torch.full_like(inp["y"], NULL), inp["y"])
    x = inp["images"].float() / 127.5 - 1.0
    logs, losses = e2e.e2e_update(s, e2e.StepInputs(x, inp["y"], y_drop, inp["zs"][0], d["t"], d["noise"], d["eps"]))
    update_ema(s.ema, s.model, 0.9999)
    for name, value in rec["terms"].items():
        _close(logs[name].reshape(()), value.reshape(()).float(), name)
    assert torch.isfinite(losses).all() and losses.shape == (3,)
    after = rec["after"]
    befores = {"model": _golden("repae_state_dict.pt"), "vae": ldm_to_diffusers(_golden("repae_vae.pt")),
               "discriminator": rec["before"]["discriminator"]}
    counts = [0, 0]  # elements compared, elements
    for what, ours in (("model", s.model.state_dict()), ("vae", s.e2e.vae.state_dict()),
                       ("discriminator", s.e2e.disc.state_dict())):
        theirs = ldm_to_diffusers(after["vae"]) if what == "vae" else after[what]
        start = befores[what]
        for k, v in theirs.items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                _close(ours[k].float(), v.float(), f"{what}.{k} after one step")
                continue
            # Adam's first step moves each weight by lr · g / (|g| + 1e-8): ±lr, except where the gradient is
            # ~1e-8, i.e. zero up to rounding (e.g. a conv bias right before a one-channel GroupNorm); there the
            # step is rounding noise in both codes and is not compared (exact zeros, unused rows, are)
            delta = (v.float() - start[k].float()).abs()
            steady = (delta > 0.9e-4) | (delta == 0)
            _close(ours[k].float()[steady], v.float()[steady], f"{what}.{k} after one step")
            counts[0] += int(steady.sum())
            counts[1] += v.numel()
    assert counts[0] > 0.95 * counts[1], counts
    for k, v in after["ema"].items():
        _close(s.ema.state_dict()[k].float(), v.float(), f"ema.{k}")
