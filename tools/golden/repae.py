"""Golden part "repae": REPA-E's SiT (latent BatchNorm), its LDM VAE and one end-to-end training step.

Imports REPA-E's ``train_repae.py`` (with its own ``models``, ``loss``, ``utils`` on the path; ``accelerate``,
``wandb``, ``h5py``, ``dictdot``, ``einops`` and ``requests`` are stubbed when missing: only unused paths need
them) and uses its objects: ``SiT_models``, ``vae_models`` (``models.autoencoder.AutoencoderKL`` with its
``Encoder`` / ``Decoder`` given a small width), ``ReconstructionLoss_Single_Stage`` (its
``configs/l1_lpips_kl_gan.yaml`` with ``perceptual_weight`` 0: LPIPS cannot load its VGG weights offline, so
its VGG is built without weights and never weighs in), ``requires_grad``, ``update_ema``, ``parse_args``.

Files:

* ``repae_state_dict.pt`` / ``repae_io.pt``: a SiT-S/1-like model on 8x8x32 latents (``bn.*`` buffers with
  random statistics) and its ``forward(x_raw, y, zs, loss_kwargs, time_input, noises)`` outputs in eval mode
  (``model_output``, ``denoising_loss``, ``proj_loss``, ``zs_tilde``) and ``inference(x, t, y)``.
* ``repae_vae.pt`` + ``repae_vae-latents-stats.pt`` (their ``save_vae_weights.py`` layout: a plain LDM state
  dict and ``{latents_scale, latents_bias}``), ``repae_vae_io.pt``: images, ``encode`` mean / std, ``decode``.
* ``repae_train.pt``: one step of ``train_repae.py``'s loop (lines 337-437, the same calls in the same order):
  the inputs, the draws their code made (posterior ε, t, noise, label-drop mask; read back by replaying the
  global RNG and checked against what the model received), every loss term and gradient norm, and the state
  of model, EMA (its ``bn.*`` buffers), VAE (without the decoder, for size) and discriminator after (before:
  the two files above and the discriminator), and
  ``vars(args)`` of their ``parse_args`` (the ``args`` a ``train_repae.py`` checkpoint carries). Their PatchGAN
  is built at width 8 (``NLayerDiscriminator(3, ndf=8, n_layers=3)``; the recipe's 64 has 2.8M parameters).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import sys
import types
from pathlib import Path

import torch

from tools.golden.common import GoldenError, log, need, randomize_, save_pt, seed_all, stub_modules

BATCH, NUM_CLASSES, LATENT, CHANNELS, RES = 4, 10, 8, 32, 32
MODEL = dict(input_size=LATENT, in_channels=CHANNELS, num_classes=NUM_CLASSES, class_dropout_prob=0.1, z_dims=[24],
             encoder_depth=2, bn_momentum=0.1, fused_attn=True, qk_norm=False)
SIZES = dict(depth=3, hidden_size=32, decoder_hidden_size=32, patch_size=1, num_heads=2, projector_dim=32)
DISC_NDF = 8
VAE = dict(ch=32, resolution=RES, attn_resolutions=(8,), num_res_blocks=1)  # f4, attention at the 8x8 level
_THEIRS = ("models", "models.sit", "models.autoencoder", "models.mocov3_vit", "loss", "loss.losses",
           "loss.lpips", "loss.perceptual_loss", "loss.discriminator", "utils", "dataset", "samplers", "train_repae")


class _DotDict(dict):
    __getattr__ = dict.__getitem__


@contextlib.contextmanager
def _their_code(repo: Path):
    """``train_repae`` imported from ``repo`` (its top-level packages on sys.path), removed again on exit."""
    clash = [m for m in _THEIRS if m in sys.modules]
    if clash:
        raise GoldenError(f"modules {clash} are already imported; run the repae part in its own process")
    sys.path.insert(0, str(repo))
    stubs = dict(**{"accelerate.Accelerator": object, "accelerate.logging.get_logger": logging.getLogger,
                    "accelerate.utils.ProjectConfiguration": object, "accelerate.utils.set_seed": lambda *a: None,
                    "dictdot.dictdot": _DotDict, "einops.rearrange": None})
    try:
        with stub_modules("accelerate", "accelerate.logging", "accelerate.utils", "wandb", "h5py", "dictdot",
                          "einops", "requests", **stubs):
            yield importlib.import_module("train_repae")
    finally:
        sys.path.remove(str(repo))
        for m in _THEIRS:
            sys.modules.pop(m, None)


def _small_vae(train_repae):
    """Their f16d32 autoencoder class with a small width (ch 32, 3 levels, attention at 8x8), seeded."""
    ae = sys.modules["models.autoencoder"]
    enc, dec = ae.Encoder, ae.Decoder
    ae.Encoder, ae.Decoder = functools.partial(enc, **VAE), functools.partial(dec, **VAE)
    try:
        return ae.AutoencoderKL(embed_dim=CHANNELS, ch_mult=[1, 1, 1], use_variational=True)
    finally:
        ae.Encoder, ae.Decoder = enc, dec


def _loss_fn(train_repae, repo: Path):
    """Their ReconstructionLoss_Single_Stage on l1_lpips_kl_gan.yaml, perceptual weight 0 (VGG without weights)."""
    from omegaconf import OmegaConf

    lp = sys.modules["loss.lpips"]
    lp.LPIPS.load_pretrained = lambda self: None  # their download of the LPIPS lin layers
    tv = lp.models
    lp.models = types.SimpleNamespace(vgg16=lambda weights=None: tv.vgg16(weights=None),
                                      VGG16_Weights=tv.VGG16_Weights)
    cfg = OmegaConf.load(repo / "configs" / "l1_lpips_kl_gan.yaml")
    cfg.losses.perceptual_weight = 0.0
    loss_fn = train_repae.ReconstructionLoss_Single_Stage(cfg)
    d = sys.modules["loss.discriminator"]  # their PatchGAN at width 8 (64 in the recipe: 2.8M parameters)
    loss_fn.discriminator = d.NLayerDiscriminator(input_nc=3, ndf=DISC_NDF, n_layers=3).apply(d.weights_init)
    return loss_fn


def _model_record(train_repae, gen) -> tuple[torch.nn.Module, dict]:
    model = sys.modules["models.sit"].SiT(path_type="linear", **MODEL, **SIZES)  # their class, small sizes
    randomize_(model, gen)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(CHANNELS, generator=gen))
        model.bn.running_var.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
    model.eval()
    x = torch.randn(BATCH, CHANNELS, LATENT, LATENT, generator=gen) * 2 + 0.5
    y = torch.tensor([0, 3, NUM_CLASSES, NUM_CLASSES - 1])
    zs = [torch.randn(BATCH, LATENT * LATENT, 24, generator=gen)]
    t = torch.tensor([0.0, 0.3, 0.7, 1.0]).reshape(BATCH, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen)
    kw = dict(path_type="linear", prediction="v", weighting="uniform", align_only=False)
    with torch.no_grad():
        out = model(x=x, y=y, zs=zs, loss_kwargs=kw, time_input=t, noises=noise)
        inf = model.inference(x, t.flatten(), y)
    return model, {"x": x, "y": y, "zs": zs, "t": t.flatten(), "noise": noise, "model_output": out["model_output"],
                   "denoising_loss": out["denoising_loss"], "proj_loss": out["proj_loss"],
                   "zs_tilde": out["zs_tilde"], "inference": inf, "config": {**MODEL, **SIZES}}


def _vae_record(train_repae, gen) -> tuple[torch.nn.Module, dict, dict]:
    vae = _small_vae(train_repae).eval()  # their default (seeded) initialisation
    images = torch.randint(0, 256, (BATCH, 3, RES, RES), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        post = vae.encode(train_repae.preprocess_imgs_vae(images))
        z = torch.randn(post.mean.shape, generator=gen)
        dec = vae.decode(z).sample
    stats = {"latents_scale": (torch.rand(1, CHANNELS, 1, 1, generator=gen) + 0.5),
             "latents_bias": torch.randn(1, CHANNELS, 1, 1, generator=gen) * 0.3}
    return vae, stats, {"images": images, "mean": post.mean, "std": post.std, "z": z, "decoded": dec}


def _train_step(tr, model, vae, loss_fn, ema, opts, inputs) -> dict:
    """train_repae.py lines 337-437 for one step (global_step 0), with their objects, in their order."""
    opt, opt_vae, opt_disc = opts
    images, labels, zs = inputs["images"], inputs["y"], inputs["zs"]
    vae.train()
    model.train()
    processed = tr.preprocess_imgs_vae(images)
    posterior, z, recon = vae(processed)
    kw = dict(path_type="linear", prediction="v", weighting="uniform")
    tr.requires_grad(model, False)
    model.eval()
    vae_loss, vd = loss_fn(processed, recon, posterior, 0, "generator")
    vae_loss = vae_loss.mean()
    kw["align_only"] = True
    align = model(x=z, y=labels, zs=zs, loss_kwargs=kw, time_input=None, noises=None)
    vae_loss = vae_loss + 1.5 * align["proj_loss"].mean()
    vae_loss.backward()
    gn_vae = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt_vae.step()
    opt_vae.zero_grad(set_to_none=True)
    d_loss, dd = loss_fn(processed, recon, posterior, 0, "discriminator")
    d_loss = d_loss.mean()
    d_loss.backward()
    gn_disc = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), 1.0)
    opt_disc.step()
    opt_disc.zero_grad(set_to_none=True)
    tr.requires_grad(model, True)
    model.train()
    kw["align_only"] = False
    sit = model(x=z.detach(), y=labels, zs=zs, loss_kwargs=kw, time_input=align["time_input"], noises=align["noises"])
    sit_loss = sit["denoising_loss"].mean() + 0.5 * sit["proj_loss"].mean()
    sit_loss.backward()
    gn_sit = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tr.update_ema(ema, model)
    return {"recon": vd["reconstruction_loss"], "kl": vd["kl_loss"], "gan": vd["weighted_gan_loss"],
            "vae_repa": align["proj_loss"].detach(), "vae": vae_loss.detach(), "disc": d_loss.detach(),
            "logits_real": dd["logits_real"], "logits_fake": dd["logits_fake"],
            "denoise": sit["denoising_loss"].detach().mean(), "repa": sit["proj_loss"].detach(),
            "total": sit_loss.detach(), "grad_norm_vae": gn_vae, "grad_norm_disc": gn_disc, "grad_norm": gn_sit,
            "time_input": align["time_input"].flatten(), "noises": align["noises"]}


def _replay(seed: int, latent_shape) -> dict:
    """The global-RNG draws of one step in their order: posterior ε, t, noise, label-drop uniforms."""
    torch.manual_seed(seed)
    eps = torch.randn(latent_shape)
    t = torch.rand((latent_shape[0], 1, 1, 1)).flatten()
    noise = torch.randn(latent_shape)
    drop = torch.rand(latent_shape[0]) < MODEL["class_dropout_prob"]
    return {"eps": eps, "t": t, "noise": noise, "drop": drop}


def _write_all(tr, repo: Path, out: Path) -> list[Path]:
    gen = seed_all(40)
    model, model_io = _model_record(tr, gen)
    model_sd = copy.deepcopy(model.state_dict())
    vae, stats, vae_io = _vae_record(tr, gen)
    torch.manual_seed(41)
    loss_fn = _loss_fn(tr, repo)
    disc_before = copy.deepcopy(loss_fn.discriminator.state_dict())
    args = tr.parse_args(["--exp-name", "golden", "--model", "SiT-S/1", "--vae", "f16d32", "--num-classes",
                          str(NUM_CLASSES), "--encoder-depth", str(MODEL["encoder_depth"])])
    ema = copy.deepcopy(model).requires_grad_(False)
    tr.update_ema(ema, model, decay=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
            for m in (model, vae, loss_fn)]
    inputs = {"images": vae_io["images"], "y": model_io["y"], "zs": model_io["zs"]}
    vae_sd = copy.deepcopy(vae.state_dict())
    before = {"discriminator": disc_before}  # model: repae_state_dict.pt, vae: repae_vae.pt
    torch.manual_seed(42)
    terms = _train_step(tr, model, vae, loss_fn, ema, opts, inputs)
    draws = _replay(42, vae_io["mean"].shape)
    if not (torch.equal(draws["t"], terms["time_input"]) and torch.equal(draws["noise"], terms["noises"])):
        raise GoldenError("replayed RNG draws differ from what REPA-E's model used")
    after = {"model": model.state_dict(), "ema": {k: v for k, v in ema.state_dict().items() if k.startswith("bn.")},
             "vae": {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.")},
             "discriminator": loss_fn.discriminator.state_dict()}
    out = Path(out)
    return [save_pt(model_sd, out / "repae_state_dict.pt"), save_pt(model_io, out / "repae_io.pt"),
            save_pt(vae_sd, out / "repae_vae.pt"), save_pt(stats, out / "repae_vae-latents-stats.pt"),
            save_pt(vae_io, out / "repae_vae_io.pt"),
            save_pt({"inputs": inputs, "draws": draws, "before": before, "after": after,
                     "terms": {k: v for k, v in terms.items() if k not in ("time_input", "noises")},
                     "config": {**MODEL, **SIZES}, "disc_ndf": DISC_NDF, "args": vars(args)},
                    out / "repae_train.pt")]


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Write the REPA-E files (needs ``--repae``)."""
    if not need(repos, "repae", part="repae"):
        return []
    repo = Path(repos["repae"])
    with _their_code(repo) as train_repae:
        log.info("repae: REPA-E code from %s", repo)
        return _write_all(train_repae, repo, Path(out_dir))
