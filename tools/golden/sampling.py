"""Golden files for the samplers, made by running the official samplers on small random models built with
the official model code (REPA ``samplers.py``; DiT ``diffusion`` p_sample_loop / ddim_sample_loop; SiT
``transport`` Euler SDE). Part module of ``python -m tools.golden``: ``write(out_dir, repos) -> [paths]``.

Each file ``sampling_{repa,dit,sit}.pt`` holds the model ``state_dict`` (load it with
``repa_probe.checkpoint.load_model(..., time_convention=convention_of(family), num_heads=...)``), the fixed
``noise`` / ``labels`` and ``cases``: per case the settings, the RNG ``seed`` set with ``torch.manual_seed`` right before the official
call (stochastic methods), ``noise_rows`` (the official loop draws its per-step noise for that many rows and
uses the first B: CFG doubles the batch in DiT/SiT) and the official ``out``.
Run alone: ``python -m tools.golden.sampling --repa DIR --dit DIR --sit DIR --out tests/data/golden``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import torch

from tools.golden.common import commit_of, repo_on_path

log = logging.getLogger("tools.golden")
B, C, SIZE, HIDDEN, DEPTH, HEADS = 3, 4, 8, 32, 2, 2


def _randomise(model: torch.nn.Module, seed: int) -> dict:
    """Perturb every parameter (the adaLN-Zero init outputs zeros) and return a cloned state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _inputs(seed: int, num_classes: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, SIZE, SIZE, generator=g), torch.randint(0, num_classes, (B,), generator=g)


def repa_cases(repo: Path) -> dict:
    """REPA euler / heun / Euler–Maruyama on a REPA SiT (1000 classes: REPA's samplers hard-code null 1000)."""
    with repo_on_path(repo):
        sit = importlib.import_module("models.sit")
        samplers = importlib.import_module("samplers")
        torch.manual_seed(0)
        model = sit.SiT(input_size=SIZE, patch_size=2, in_channels=C, hidden_size=HIDDEN, depth=DEPTH,
                        num_heads=HEADS, decoder_hidden_size=HIDDEN, encoder_depth=1, num_classes=1000, use_cfg=True, z_dims=[16],
                        projector_dim=32, class_dropout_prob=0.1, qk_norm=False,
                        fused_attn=False)
        sd = _randomise(model, 1)
        noise, labels = _inputs(2, 1000)
        specs = {
            "euler": dict(method="euler", steps=6, cfg_scale=1.0, low=0.0, high=1.0),
            "heun_cfg": dict(method="heun", steps=5, cfg_scale=1.8, low=0.0, high=0.7),
            "euler_cfg_interval": dict(method="euler", steps=8, cfg_scale=2.5, low=0.3, high=0.6),
            "sde_cfg": dict(method="sde", steps=7, cfg_scale=1.8, low=0.0, high=0.7, seed=5),
        }
        cases = {}
        for name, s in specs.items():
            fn = samplers.euler_maruyama_sampler if s["method"] == "sde" else samplers.euler_sampler
            torch.manual_seed(s.get("seed", 0))
            out = fn(model, noise.clone(), labels, num_steps=s["steps"], heun=s["method"] == "heun",
                     cfg_scale=s["cfg_scale"], guidance_low=s["low"], guidance_high=s["high"], path_type="linear")
            cases[name] = dict(s, noise_rows=B, out=out.to(torch.float64))
    return dict(family="REPA", num_heads=HEADS, state_dict=sd, noise=noise, labels=labels, cases=cases)


def dit_cases(repo: Path) -> dict:
    """DiT p_sample_loop (ancestral, learned variance) and ddim_sample_loop, plain and with forward_with_cfg."""
    with repo_on_path(repo):
        models = importlib.import_module("models")
        diffusion_pkg = importlib.import_module("diffusion")
        torch.manual_seed(0)
        model = models.DiT(input_size=SIZE, patch_size=2, in_channels=C, hidden_size=HIDDEN, depth=DEPTH,
                           num_heads=HEADS, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
        sd = _randomise(model, 3)
        noise, labels = _inputs(4, 10)
        specs = {
            "ddpm": dict(method="ddpm", steps=10, cfg_scale=1.0, seed=7),
            "ddpm_cfg": dict(method="ddpm", steps=12, cfg_scale=1.5, seed=8),
            "ddim": dict(method="ddim", steps=10, cfg_scale=1.0),
            "ddim_cfg": dict(method="ddim", steps=25, cfg_scale=4.0),
        }
        cases = {}
        for name, s in specs.items():
            diffusion = diffusion_pkg.create_diffusion(str(s["steps"]))
            guided = s["cfg_scale"] != 1.0
            z = torch.cat([noise, noise]) if guided else noise.clone()
            y = torch.cat([labels, torch.full_like(labels, 10)]) if guided else labels
            kw = dict(y=y, cfg_scale=s["cfg_scale"]) if guided else dict(y=y)
            fn = model.forward_with_cfg if guided else model.forward
            loop = diffusion.p_sample_loop if s["method"] == "ddpm" else diffusion.ddim_sample_loop
            torch.manual_seed(s.get("seed", 0))
            out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kw, progress=False, device="cpu")
            cases[name] = dict(s, low=0.0, high=1.0, noise_rows=z.shape[0], out=out[:B].to(torch.float64))
    return dict(family="DiT", num_heads=HEADS, state_dict=sd, noise=noise, labels=labels, cases=cases)


def sit_cases(repo: Path) -> dict:
    """SiT's sigma-form Euler SDE (Mean last step 0.04) on an official SiT (learn_sigma, t = 0 noise)."""
    with repo_on_path(repo, stub_torchdiffeq=True):
        models = importlib.import_module("models")
        transport = importlib.import_module("transport")
        torch.manual_seed(0)
        model = models.SiT(input_size=SIZE, patch_size=2, in_channels=C, hidden_size=HIDDEN, depth=DEPTH,
                           num_heads=HEADS, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
        sd = _randomise(model, 6)
        noise, labels = _inputs(7, 10)
        sampler = transport.Sampler(transport.create_transport("Linear", "velocity"))
        specs = {"sde": dict(method="sde", steps=9, cfg_scale=1.0, seed=11),
                 "sde_cfg": dict(method="sde", steps=6, cfg_scale=1.5, seed=12)}
        cases = {}
        for name, s in specs.items():
            fn = sampler.sample_sde(sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0,
                                    last_step="Mean", last_step_size=0.04, num_steps=s["steps"])
            guided = s["cfg_scale"] != 1.0
            z = torch.cat([noise, noise]) if guided else noise.clone()
            y = torch.cat([labels, torch.full_like(labels, 10)]) if guided else labels
            torch.manual_seed(s["seed"])
            with torch.no_grad():
                if guided:
                    out = fn(z, model.forward_with_cfg, y=y, cfg_scale=s["cfg_scale"])[-1]
                else:
                    out = fn(z, model.forward, y=y)[-1]
            cases[name] = dict(s, low=0.0, high=1.0, noise_rows=z.shape[0], out=out[:B].to(torch.float64))
    return dict(family="SiT", num_heads=HEADS, state_dict=sd, noise=noise, labels=labels, cases=cases)


PARTS = {"repa": repa_cases, "dit": dit_cases, "sit": sit_cases}


def write(out_dir: Path, repos: dict, commits: dict | None = None) -> list:
    """Write ``sampling_<repo>.pt`` for each official repo given in ``repos``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, make in PARTS.items():
        repo = repos.get(key)
        if repo is None or not Path(repo).is_dir():
            log.warning("sampling golden: no %s repo given, skipping sampling_%s.pt", key, key)
            continue
        data = make(Path(repo))
        data["source"] = f"{key} @ {commit_of(Path(repo), commits, key)}"
        path = out_dir / f"sampling_{key}.pt"
        torch.save(data, path)
        written.append(path)
        log.info("wrote %s (%s)", path, data["source"])
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.golden.sampling", description=__doc__.splitlines()[0])
    for key in PARTS:
        p.add_argument(f"--{key}", type=Path, help=f"work tree of the official {key} repo")
    p.add_argument("--out", type=Path, default=Path("tests/data/golden"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write(args.out, {k: getattr(args, k) for k in PARTS}):
        print(path)


if __name__ == "__main__":
    main()
